"""``backward_per_chunk``: each forward chunk back-propagated at once, so a step holds one chunk's activations;
the same gradients as one backward (fp32), through a real Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import build_cpu_trainer, build_tiny_hh_data

from meet_lightning.controls.tokens import PromptTuningControl
from meet_lightning.data.tokenization import batch_part, batch_units
from meet_lightning.modules import DPOModule, HybridDPOModule, JointFinetuneModule, SFTModule

MODULES = {
    "stage2": lambda schema, **o: JointFinetuneModule("tiny-debug", PromptTuningControl(3, "random"), schema, **o),
    "stage2_per_response": lambda schema, **o: JointFinetuneModule(
        "tiny-debug", PromptTuningControl(3, "random", placement="infix"), schema, per_response_loss=True, **o
    ),
    "sft": lambda schema, **o: SFTModule("tiny-debug", None, schema, **o),
    "dpo": lambda schema, **o: DPOModule("tiny-debug", None, schema, precompute_reference=False, **o),
    "hybrid": lambda schema, **o: HybridDPOModule("tiny-debug", PromptTuningControl(3, "random"), schema, **o),
}
PAIRED = {"sft", "dpo", "hybrid"}


class Held:
    """A saved activation, counted while autograd keeps it (the graph drops it after backward)."""

    def __init__(self, tensor: torch.Tensor, meter: Recorder) -> None:
        self.tensor, self.meter, self.size = tensor, meter, tensor.numel() * tensor.element_size()
        meter.live += self.size
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.size


class Recorder(L.Callback):
    """The gradients at the optimizer step, the backward passes per step, and the peak bytes of saved activations
    (tensors autograd keeps for backward that are not parameters)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.backwards = self.live = self.peak = 0
        self.hooks = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        weights = {p.untyped_storage().data_ptr() for p in module.parameters()}

        def pack(tensor):
            return tensor if tensor.untyped_storage().data_ptr() in weights else Held(tensor, self)

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda held: getattr(held, "tensor", held))
        self.hooks.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.hooks.__exit__(None, None, None)

    def on_before_backward(self, trainer, module, loss):
        self.backwards += 1

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def train_step(tmp_path, kind, data, per_chunk, accumulate=1):
    """One optimizer step of ``kind`` (a name in MODULES, or a module factory) with four forward chunks."""
    torch.manual_seed(0)
    build = MODULES[kind] if isinstance(kind, str) else kind
    module = build(data.control_schema, forward_chunks=4, backward_per_chunk=per_chunk)
    recorder = Recorder()
    trainer = build_cpu_trainer(
        tmp_path / f"{type(module).__name__}-{per_chunk}", 1, precision="32-true", callbacks=[recorder],
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return recorder, float(trainer.callback_metrics["train/loss"])


@pytest.fixture(scope="module")
def datas(shared_data):
    rows = build_tiny_hh_data(shared_data, max_length=256, batch_size=4, max_examples=24, max_val_examples=2)
    pairs = build_tiny_hh_data(shared_data, max_length=256, batch_size=6, max_examples=24, pair_batches=True, max_val_examples=2)
    return {"rows": rows, "pairs": pairs}


def assert_same_gradients(one, parts):
    assert one.grads.keys() == parts.grads.keys() and one.grads
    for name, grad in one.grads.items():
        # fp32 sums in another order: equal to ~1e-6 of the largest entry
        torch.testing.assert_close(parts.grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("kind", ["stage2", "stage2_per_response", "sft", "dpo"])
def test_a_backward_per_chunk_gives_the_same_gradients_and_holds_fewer_activations(tmp_path, kind, datas):
    data = datas["pairs" if kind in PAIRED else "rows"]
    one, loss = train_step(tmp_path, kind, data, per_chunk=False)
    parts, parts_loss = train_step(tmp_path, kind, data, per_chunk=True)
    assert (one.backwards, parts.backwards) == (1, 4)
    assert parts_loss == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(one, parts)
    assert parts.peak < 0.6 * one.peak, (parts.peak, one.peak)  # one chunk of four held at a time, not all four


def test_gradient_accumulation_adds_the_parts_of_every_batch(tmp_path, datas):
    """The parts' gradients survive Lightning's zeroing and add up over ``accumulate_grad_batches``."""
    one, _ = train_step(tmp_path, "stage2", datas["rows"], per_chunk=False, accumulate=2)
    parts, _ = train_step(tmp_path, "stage2", datas["rows"], per_chunk=True, accumulate=2)
    assert (one.backwards, parts.backwards) == (2, 8)
    assert_same_gradients(one, parts)


def test_a_loss_that_does_not_split_runs_one_backward(tmp_path, datas):
    """HybridDPO mixes a token-mean NLL with a pair-mean DPO term: no single weight splits it."""
    one, loss = train_step(tmp_path, "hybrid", datas["pairs"], per_chunk=False)
    asked, asked_loss = train_step(tmp_path, "hybrid", datas["pairs"], per_chunk=True)
    assert asked.backwards == 1 and asked_loss == loss
    assert_same_gradients(one, asked)


class OwnObjective(JointFinetuneModule):
    """A user's objective: the token NLL times two (the base class's weight would still describe it, but no rule
    can know that of an arbitrary loss)."""

    def compute_loss(self, batch):
        return {"loss": 2 * super().compute_loss(batch)["loss"]}


def test_a_subclass_that_overrides_only_the_objective_runs_one_backward(tmp_path, datas):
    own = lambda schema, **o: OwnObjective("tiny-debug", PromptTuningControl(3, "random"), schema, **o)  # noqa: E731
    recorder, _ = train_step(tmp_path, own, datas["rows"], per_chunk=True)
    assert recorder.backwards == 1


def test_a_part_of_a_paired_batch_keeps_its_layout():
    ids = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0], [6, 0, 0, 0], [7, 8, 0, 0]])  # chosen 0, 1; rejected 0, 1
    mask = (ids > 0).long()
    batch = {
        "input_ids": ids, "attention_mask": mask, "labels": ids * mask - 100 * (1 - mask),
        "control_ids": torch.tensor([[0], [0], [1], [1]]), "response_start": torch.tensor([1, 1, 1, 1]),
        "num_pairs": torch.tensor(2),
    }  # fmt: skip
    assert batch_units(batch) == [2, 3]
    part = batch_part(batch, [0])
    assert part["input_ids"].tolist() == [[1, 2], [6, 0]]  # chosen 0 then rejected 0, cut to the longer
    assert part["control_ids"].tolist() == [[0], [1]] and int(part["num_pairs"]) == 1
    assert batch_part({k: v for k, v in batch.items() if k != "num_pairs"}, [2])["input_ids"].tolist() == [[6]]
