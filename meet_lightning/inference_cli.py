"""The inference commands, ``generate`` and ``evaluate``: parsers only, over the core's Python API.

``evaluate``'s flags are :class:`~meet_lightning.report.EvaluateOptions`' fields (their docstrings are the help),
so ``evaluate --model M --data.path F`` and ``run_evaluation(EvaluateOptions(model=M, data=EvalData(path=F)))``
are the same call.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from jsonargparse import set_parsing_settings

from meet_lightning.cli import OneLineParser
from meet_lightning.errors import ConfigError
from meet_lightning.export import AlignedModel
from meet_lightning.precision import WeightsDtype
from meet_lightning.report import EvaluateOptions, run_evaluation


def generate_command(argv: Sequence[str]) -> int:
    """``generate --model DIR --control NAME [--control NAME ...] --prompt TEXT``."""
    parser = OneLineParser(prog="meet_lightning generate", description="generate under chosen controls")
    parser.add_argument("--model", type=str, required=True, help="an export/ folder")
    parser.add_argument("--control", type=str, action="append", default=[], help="control name; repeat to combine preferences")
    parser.add_argument("--prompt", type=str, required=True, help="the user message")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument(
        "--dtype",
        type=str,
        default="auto",
        choices=list(get_args(WeightsDtype)),
        help="weights dtype; auto: bfloat16 where the CPU or GPU computes it natively, else float32",
    )
    args = parser.parse_args(list(argv))
    if args.max_new_tokens < 1 or args.temperature < 0:
        raise ConfigError("--max_new_tokens must be ≥ 1 and --temperature ≥ 0")
    model = AlignedModel.from_pretrained(args.model, dtype=args.dtype)
    print(
        model.generate(
            [args.prompt], control=args.control or None, max_new_tokens=args.max_new_tokens, temperature=args.temperature
        )[0]
    )
    return 0


def evaluate_command(argv: Sequence[str]) -> int:
    """``evaluate --model DIR [--data.path FILE] [--fidelity_prompts FILE.jsonl] [--reward_model DIR] [--judge SPEC] [--plots DIR]``."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the options' field docstrings are the help
    parser = OneLineParser(
        prog="meet_lightning evaluate", description="score a model: pairwise metrics, control fidelity, rewards"
    )
    parser.add_argument("--output", type=str | None, default=None, help="also write the metrics as JSON here")
    parser.add_class_arguments(EvaluateOptions, nested_key=None, as_group=False)
    # `--attribute A --attribute B` appends, as the help says (a plain list flag would keep only B)
    parsed = parser.instantiate(parser.parse_args(["--attribute+" if a == "--attribute" else a for a in argv]))
    fields = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(EvaluateOptions)}
    metrics = run_evaluation(EvaluateOptions(**fields))
    text = json.dumps(metrics, indent=2)
    print(text)
    if parsed.output:
        Path(parsed.output).parent.mkdir(parents=True, exist_ok=True)
        Path(parsed.output).write_text(text + "\n")
    return 0
