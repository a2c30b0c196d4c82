"""What a training step keeps for backward at the end of its forward, with the LM head's logits kept and recomputed.

Counts the bytes of every tensor autograd saves (weights excluded, each storage once) during stage 2's forward in one
pass (``forward_chunks`` 1, as on a GPU) with gradient checkpointing on, first with the head's logits kept (the
behaviour before the head recomputed them), then recomputed in backward (:class:`~meet_lightning.heads.LMHead`).
Byte counts do not depend on the machine's speed or load.

    python benchmarks/saved_for_backward.py                 # the first real batch of 8 HH pairs
    python benchmarks/saved_for_backward.py --longest       # the same rows continued to --max-length, all response
"""

from __future__ import annotations

import argparse
import os
from unittest import mock

import torch

import meet_lightning.heads as heads
from meet_lightning.controls.tokens import PromptTuningControl
from meet_lightning.data.datamodule import PreferenceDataModule
from meet_lightning.data.tokenization import longest_batch
from meet_lightning.modules import JointFinetuneModule


def kept_bytes(module: JointFinetuneModule, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd holds for backward once ``compute_loss`` returns; runs the backward after counting."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module.compute_loss(batch)["loss"]
    loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(kept.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--data", default=os.path.join(os.environ.get("MEET_SHARED_DATA", "../shared/data"), "hh_rlhf_harmless.train.jsonl.gz")
    )
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--longest", action="store_true", help="every row continued to --max-length, every token a response token")
    args = p.parse_args()
    data = PreferenceDataModule(path=args.data, preference="harmless", model_name_or_path=args.model, max_length=args.max_length,
                                batch_size=args.pairs, pair_batches=True, max_examples=8 * args.pairs)  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = longest_batch(batch, args.max_length) if args.longest else batch
    module = JointFinetuneModule(args.model, PromptTuningControl(20, "random"), data.control_schema,
                                 gradient_checkpointing=True, forward_chunks=1)  # fmt: skip
    module.configure_model()
    module.train()
    with mock.patch.object(heads, "is_checkpointed", lambda lm: False):  # the head as before: logits kept
        kept = kept_bytes(module, batch)
    recomputed = kept_bytes(module, batch)
    rows, width = batch["input_ids"].shape
    print(f"{args.model}, {rows} rows × {width} tokens, {int((batch['labels'] != -100).sum())} response tokens, one pass, "
          f"gradient checkpointing, fp32: kept for backward {kept / 2**30:.2f} GiB with the head's logits kept, "
          f"{recomputed / 2**30:.2f} GiB recomputed ({recomputed / kept:.2f}×)")  # fmt: skip


if __name__ == "__main__":
    main()
