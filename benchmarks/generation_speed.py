"""Generation with rows leaving the batch as they stop, against ``lm.generate``, side by side in one process.

``lm.generate`` computes every row of a batch until the last one stops: one answer that loops to the length cap
makes every other row of its batch run to the cap too. :func:`meet_lightning.inference.generation.decode_dropping_finished`
drops a row (and its KV cache) as soon as it stops. Both paths decode the same distribution (the same logits
processors; ``tests/test_generation_loop.py`` checks they draw the same tokens). This script times both on real
prompts with the length study's decoding and prints the ratio::

    python benchmarks/generation_speed.py --prompts 80 --out benchmarks/results/generation_speed.json

Run it on a quiet machine: a busy one times nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import time
from pathlib import Path
from unittest import mock

import torch
from throughput import cpu_model  # benchmarks/, this script's folder

from meet_lightning.evaluation.metrics import load_for_evaluation
from meet_lightning.inference import generation
from meet_lightning.inference.export import AlignedModel
from meet_lightning.precision import resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
ALPACA = Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data")) / "alpaca_eval_concise_verbose.train.jsonl.gz"
DECODING = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}  # the length study's


def real_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct AlpacaEval prompts, drawn with ``seed``."""
    with gzip.open(ALPACA, "rt") as lines:
        prompts = sorted({json.loads(line)["prompt"] for line in lines})
    return random.Random(seed).sample(prompts, n)


def timed(model: AlignedModel, prompts: list[str], own_loop: bool, args: argparse.Namespace) -> dict[str, float]:
    """Seconds and new tokens for every prompt's answer, through the own loop or through ``lm.generate``."""
    torch.manual_seed(args.seed)
    bf16 = resolve_dtype("auto")[0] == torch.bfloat16
    with mock.patch.object(generation, "reproduces_generation_config", return_value=own_loop):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as compare.py scores
            start = time.perf_counter()
            texts = model.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, **DECODING)
            seconds = time.perf_counter() - start
    tokens = [len(model.tokenizer(t)["input_ids"]) for t in texts]
    return {
        "seconds": seconds,
        "answers": len(texts),
        "mean_new_tokens": sum(tokens) / len(tokens),
        "cap_share": sum(t >= args.max_new_tokens - 1 for t in tokens) / len(tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, folder or export")
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=40, help="compare.py's scoring batch")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args()
    loaded = load_for_evaluation(args.model, dtype="float32")
    model = AlignedModel(loaded.lm, loaded.tokenizer, loaded.control, loaded.schema)
    prompts = real_prompts(args.prompts, args.seed)
    timed(model, prompts[:2], True, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}))  # warm-up
    generate = timed(model, prompts, False, args)
    own = timed(model, prompts, True, args)
    result = {
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "settings": {k: str(v) for k, v in vars(args).items()} | {"decoding": DECODING},
        "lm.generate": generate,
        "own loop": own,
        "speedup": generate["seconds"] / own["seconds"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
