"""Every shipped recipe's debug run, its ``done.json`` metrics collected: to show a refactor changed no behaviour.

Run it on the code before and after a change, then compare the two files::

    python benchmarks/debug_metrics.py --out before.json        # on the old checkout
    python benchmarks/debug_metrics.py --out after.json         # on the new one
    python benchmarks/debug_metrics.py --compare before.json after.json

Each recipe runs with ``configs/debug.yaml`` (a tiny model built in code, 3 steps per stage, fp32 on CPU) on the
shared HH-RLHF file, in this process. Timings, memory and the cache's file identity are left out; every other number
of every stage's ``done.json`` must match to a relative 1e-6 (the same code on the same machine gives equal bits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
NOT_BEHAVIOUR = ("seconds", "tokens_per_s", "rss", "data_identity", "precision_reason")


def recipes() -> list[Path]:
    """The recipes the CLI tests run with the debug overlay on one HH file: not demo.yaml and the strategies (tested
    elsewhere), nor a recipe of several hub sources (``data.sources``; tests/test_cli.py gives each local data)."""
    found = (p for p in CONFIGS.rglob("*.yaml") if p.name not in ("debug.yaml", "demo.yaml"))
    return sorted(p for p in found if p.parent.name != "strategies" and "sources" not in (yaml.safe_load(p.read_text())["data"]))


def debug_metrics(recipe: Path, hh: Path, out: Path) -> dict[str, dict]:
    """Fit ``recipe`` with the debug overlay; each stage's ``done.json`` without timings and memory."""
    args = ["fit", "--config", str(recipe), "--config", str(CONFIGS / "debug.yaml"), "--data.path", str(hh)]
    sys.argv = ["meet_lightning", *args, "--output_dir", str(out)]
    try:  # `python -m meet_lightning` in this process: the same entry point before and after a move of its modules
        runpy.run_module("meet_lightning", run_name="__main__")
    except SystemExit as exit:
        if exit.code:
            sys.exit(f"{recipe}: the debug run failed ({exit.code})")
    return {
        done.parent.name: {k: v for k, v in json.loads(done.read_text()).items() if not any(word in k for word in NOT_BEHAVIOUR)}
        for done in sorted(out.glob("*/done.json"))
    }


def differences(before: dict, after: dict, where: str = "") -> list[str]:
    """Every value that differs between two metric trees (numbers to a relative 1e-6)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = [f"{where}/{k}: only in one file" for k in sorted(set(before) ^ set(after))]
        return found + [d for k in sorted(set(before) & set(after)) for d in differences(before[k], after[k], f"{where}/{k}")]
    if isinstance(before, float | int) and isinstance(after, float | int):
        return [] if math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-9) else [f"{where}: {before} → {after}"]
    return [] if before == after else [f"{where}: {before!r} → {after!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write {recipe: {stage: metrics}} here")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        found = differences(before, after)
        print("\n".join(found) or f"same metrics: {len(before)} recipes")
        return 1 if found else 0
    if not args.out:
        parser.error("--out FILE or --compare BEFORE AFTER")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hh = Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data")) / "hh_rlhf_harmless.train.jsonl.gz"
    with tempfile.TemporaryDirectory() as tmp:
        found = {p.relative_to(CONFIGS).as_posix(): debug_metrics(p, hh, Path(tmp) / p.stem) for p in recipes()}
    args.out.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}: {len(found)} recipes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
