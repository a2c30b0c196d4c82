"""Splits a JSONL(.gz) preference file into a training file and a held-out file, by prompt, with a fixed seed.

Every row that shares a prompt lands on the same side, so the held-out prompts are never seen in training.

    python benchmarks/heldout.py ../shared/data/hh_rlhf_harmless.train.jsonl.gz runs/hh_split --heldout 100
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections.abc import Callable
from pathlib import Path


def hh_prompt(row: dict) -> str:
    """HH-RLHF: the transcript before the last Assistant turn of ``chosen``."""
    return row["chosen"].rsplit("\n\nAssistant:", 1)[0]


def field_prompt(row: dict) -> str:
    """Files with a ``prompt`` or ``instruction`` field."""
    return row.get("prompt") or row["instruction"]


def prompt_key(row: dict) -> str:
    """The prompt of a row of any of the JSONL formats the benchmarks use."""
    return hh_prompt(row) if "chosen" in row and isinstance(row["chosen"], str) else field_prompt(row)


def _open(path: Path, mode: str):
    return gzip.open(path, mode + "t", encoding="utf-8") if path.suffix == ".gz" else path.open(mode, encoding="utf-8")


def split_file(
    source: str | Path, dest: str | Path, num_heldout: int, seed: int = 1234, key: Callable[[dict], str] = prompt_key
) -> tuple[Path, Path]:
    """Writes ``dest/train.jsonl`` and ``dest/heldout.jsonl``; the held-out side has ``num_heldout`` prompts.

    Returns:
        The paths of the training and held-out files.
    """
    source, dest = Path(source), Path(dest)
    with _open(source, "r") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = sorted({key(row) for row in rows})
    random.Random(seed).shuffle(prompts)
    heldout = set(prompts[:num_heldout])
    dest.mkdir(parents=True, exist_ok=True)
    paths = dest / "train.jsonl", dest / "heldout.jsonl"
    for path, keep in zip(paths, (False, True), strict=True):
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows if (key(row) in heldout) == keep)
        tmp.replace(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("dest")
    parser.add_argument("--heldout", type=int, default=100, help="number of held-out prompts")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    train, heldout = split_file(args.source, args.dest, args.heldout, args.seed)
    print(f"{train}\n{heldout}")


if __name__ == "__main__":
    main()
