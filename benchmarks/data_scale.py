"""Data at a user's scale (issue 17): build and reload time of the tokenized-data cache, peak RSS while building and
while training, on a large local file made for the purpose.

The file is the shared HH-RLHF sample repeated with distinct prompts (``[copy K]`` put before the first Human
turn of copy K) up to ``--pairs`` pairs, written to a temporary folder. Every phase runs in its own
subprocess, so each peak RSS (``ru_maxrss``) is that phase's own:

* ``build`` — a fresh ``PreferenceDataModule`` (the recipe's data options) and ``setup()``: read, split,
  tokenize with ``--num-proc`` workers, save the cache;
* ``load`` — the same in a new process, the cache now there: the time a second run, stage 2, ``validate``,
  the export or another DDP rank waits for its data;
* ``train_large`` / ``train_small`` — ``fit`` through the CLI (debug overlay: tiny model, ``--steps`` steps,
  stage 1 only) on the large file (cache reused) and on the 1,800-pair file: the difference of their peak RSS is
  what holding the large data costs the training process.

    python benchmarks/data_scale.py --pairs 100000 --num-proc 2 --json runs/data_scale.json

Public API only: ``meet_lightning.data.datamodule.PreferenceDataModule`` and the command line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data"))
HH = SHARED / "hh_rlhf_harmless.train.jsonl.gz"


def make_large_file(target: Path, pairs: int) -> Path:
    """The HH sample repeated with distinct prompts to ``pairs`` lines (gzipped JSON Lines)."""
    lines = gzip.decompress(HH.read_bytes()).decode().splitlines()
    with gzip.open(target, "wt", encoding="utf-8") as handle:
        for index in range(pairs):
            copy, row = divmod(index, len(lines))
            record = json.loads(lines[row])
            if copy:
                tag = f"\n\nHuman: [copy {copy}] "
                record = {key: text.replace("\n\nHuman: ", tag, 1) for key, text in record.items()}
            handle.write(json.dumps(record) + "\n")
    return target


def fit_argv(data: Path, out: Path, cache: Path, steps: int, num_proc: int | None) -> list[str]:
    return [
        "fit",
        "--config", str(ROOT / "configs" / "meet_hh_prompt.yaml"),
        "--config", str(ROOT / "configs" / "debug.yaml"),
        "--data.path", str(data),
        "--data.max_length", "512",
        "--data.max_examples", "null",
        "--data.max_val_examples", "64",
        "--data.cache_dir", str(cache),
        "--data.num_proc", "null" if num_proc is None else str(num_proc),
        "--stage2.model", "null",
        "--stage1.trainer.max_steps", str(steps),
        "--output_dir", str(out),
    ]  # fmt: skip


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def phase_data(argv: list[str]) -> dict:
    """``build`` / ``load``: the data module of the recipe in ``argv``, set up once."""
    from meet_lightning.commands.cli import parse_recipe
    from meet_lightning.data.datamodule import PreferenceDataModule

    recipe, _ = parse_recipe("fit", argv[1:])
    start = time.perf_counter()
    data = PreferenceDataModule(**{**recipe.data, "model_name_or_path": recipe.model_name_or_path})
    data.setup("fit")
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2),
        "built": data.prepared.built,
        "train_units": len(data.train_items),
        "val_units": len(data.val_items),
        "cache": str(data.prepared.path),
        "cache_mb": round(sum(f.stat().st_size for f in data.prepared.path.rglob("*") if f.is_file()) / 2**20, 1),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def phase_train(argv: list[str]) -> dict:
    from meet_lightning.commands.cli import main

    start = time.perf_counter()
    code = main(argv)
    return {"exit_code": code, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb())}


def run_phase(name: str, argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--phase", name, "--argv", json.dumps(argv)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"phase {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs in the large file")
    parser.add_argument("--num-proc", type=int, default=2, help="datasets.map workers for the build")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the train phases")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--argv", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phase = phase_data if args.phase in ("build", "load") else phase_train
        print(json.dumps(phase(json.loads(args.argv))))
        return
    with tempfile.TemporaryDirectory(prefix="meet-data-scale-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        large = make_large_file(folder / "hh_large.jsonl.gz", args.pairs)
        results: dict = {"pairs": args.pairs, "file_mb": round(large.stat().st_size / 2**20, 1), "num_proc": args.num_proc}
        results["write_file_seconds"] = round(time.perf_counter() - start, 1)
        cache = folder / "cache"
        large_argv = fit_argv(large, folder / "run_large", cache, args.steps, args.num_proc)
        for name, argv in (
            ("build", large_argv),
            ("load", large_argv),
            ("train_large", large_argv),
            ("train_small", fit_argv(HH, folder / "run_small", cache, args.steps, None)),
        ):
            results[name] = run_phase(name, argv)
            print(name, results[name], flush=True)
        results["train_rss_growth_mb"] = results["train_large"]["peak_rss_mb"] - results["train_small"]["peak_rss_mb"]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
