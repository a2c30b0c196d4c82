"""The commands around an export, ``generate``, ``evaluate`` and ``push``: parsers only, over the core's Python API.

``evaluate``'s flags are :class:`~meet_lightning.evaluation.run.EvaluateOptions`' fields (their docstrings are the help),
so ``evaluate --model M --data.path F`` and ``run_evaluation(EvaluateOptions(model=M, data=EvalData(path=F)))``
are the same call.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ActionConfigFile, set_parsing_settings

from meet_lightning.commands.cli import OneLineParser, check_config_files
from meet_lightning.errors import ConfigError
from meet_lightning.evaluation.judges import import_callable
from meet_lightning.evaluation.loading import load_for_evaluation
from meet_lightning.evaluation.run import EvaluateOptions, run_evaluation
from meet_lightning.inference.chat import ChatSession, check_decoding, run_chat
from meet_lightning.inference.export import AlignedModel
from meet_lightning.inference.generation import DecodingOptions, as_messages, read_prompt_file, row_controls, write_jsonl_atomic
from meet_lightning.inference.publish import push_export
from meet_lightning.inference.serve import ControlServer, make_server
from meet_lightning.precision import WeightsDtype
from meet_lightning.recipe import Recipe
from meet_lightning.training.callbacks import log_evaluation
from meet_lightning.training.loggers import check_loggers, stage_loggers

AUTO_DEVICE = "auto"
DEVICE_HELP = "where the model runs: cuda, cuda:N, mps, cpu; auto: cuda when there is a GPU, else mps, else cpu"


def available_device() -> str:
    """The accelerator that is there: ``cuda`` when a GPU is visible, else ``mps`` (Apple silicon), else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def resolve_device(device: str) -> str:
    """``device``, with ``auto`` replaced by :func:`available_device`."""
    return available_device() if device == AUTO_DEVICE else device


def add_config_flag(parser: OneLineParser, command: str) -> None:
    """``--config FILE``: a YAML file of the command's own flags (later flags win; ``--print_config`` writes one)."""
    parser.add_argument("--config", action=ActionConfigFile, help=f"YAML file of {command}'s flags, e.g. model: run/export")


def parse_command(parser: OneLineParser, argv: Sequence[str]):
    """Parses ``argv`` after checking its ``--config`` files (one line naming a file that is not a YAML mapping)."""
    check_config_files(argv)
    return parser.parse_args(list(argv))


def control_names(values: str | Sequence[str]) -> list[str]:
    """``--control`` values as names. From a ``--config`` file the appended flag arrives as one string: a name
    (``control: concise``) or the text of a YAML list (``control: [concise, harmless/good]``), which is read back
    as a list (a control name never holds brackets, so nothing else is read this way)."""
    names: list[str] = []
    for value in [values] if isinstance(values, str) else values:
        listed = yaml.safe_load(value) if value.startswith("[") and value.endswith("]") else None
        names += [str(v) for v in listed] if isinstance(listed, list) else [value]
    return names


def generate_command(argv: Sequence[str]) -> int:
    """``generate --model DIR (--prompt TEXT | --prompts_file FILE) [--control NAME ...] [--output FILE.jsonl]``."""
    parser = OneLineParser(prog="meet_lightning generate", description="generate under chosen controls")
    add_config_flag(parser, "generate")
    parser.add_argument("--model", type=str, required=True, help="an export/ folder")
    parser.add_argument("--prompt", type=str | None, default=None, help="the user message")
    parser.add_argument(
        "--prompts_file", type=str | None, default=None,
        help="JSONL with 'prompt' and optional 'controls' per line, or a text file of one prompt per line",
    )  # fmt: skip
    parser.add_argument("--control", type=str, action="append", default=[], help="control name; repeat to combine preferences")
    parser.add_argument("--output", type=str | None, default=None, help="write {prompt, controls, response} JSONL here")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the options' field docstrings are the help
    parser.add_class_arguments(DecodingOptions, nested_key=None, as_group=False)
    parser.add_argument("--device", type=str, default=AUTO_DEVICE, help=DEVICE_HELP)
    parser.add_argument(
        "--dtype",
        type=WeightsDtype,
        default="auto",
        help="weights dtype; auto: bfloat16 where the CPU or GPU computes it natively, else float32",
    )
    args = parse_command(parser, argv)
    decoding = DecodingOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingOptions)})
    one_source = (
        []
        if (args.prompt is None) != (args.prompts_file is None)
        else ["pass exactly one of --prompt TEXT and --prompts_file FILE"]
    )
    problems = one_source + decoding.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    rows = (
        read_prompt_file(Path(args.prompts_file), "--prompts_file", plain_text=True)
        if args.prompts_file
        else [{"prompt": as_messages(args.prompt, "--prompt"), "controls": None, "row": 1}]
    )
    model = AlignedModel.from_pretrained(args.model, dtype=args.dtype, device=resolve_device(args.device))
    for row in rows:  # per-row controls win; the flags choose for rows without any
        row["controls"] = row["controls"] if row["controls"] is not None else (control_names(args.control) or None)
    if args.prompts_file:  # every row's controls, checked before anything is generated: FILE:ROW in the error
        for row in rows:
            row_controls(model.schema, row, args.prompts_file)
    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    texts = model.generate(
        [row["prompt"] for row in rows], controls=[row["controls"] for row in rows], options=decoding, progress=True
    )
    if args.output:
        results = [{"prompt": r["prompt"], "controls": r["controls"], "response": t} for r, t in zip(rows, texts, strict=True)]
        write_jsonl_atomic(Path(args.output), results)
        print(f"wrote {len(results)} responses to {args.output}")
    else:
        print("\n\n".join(texts))
    return 0


def add_model_flags(parser: OneLineParser, command: str) -> None:
    """``--config``, ``--model``, the decoding flags, ``--device`` and ``--dtype`` of ``chat`` and ``serve``."""
    add_config_flag(parser, command)
    parser.add_argument("--model", type=str, required=True, help="an export/ folder, a Hugging Face folder, an alias or a hub id")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser.add_class_arguments(DecodingOptions, nested_key=None, as_group=False)
    parser.add_argument("--device", type=str, default=AUTO_DEVICE, help=DEVICE_HELP)
    parser.add_argument(
        "--dtype", type=WeightsDtype, default="auto", help="weights dtype; auto: bfloat16 where computed natively"
    )


def add_listen_flags(parser: OneLineParser, port: int) -> None:
    """``--host`` and ``--port`` of the commands that serve over HTTP (``serve``, ``playground``)."""
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=port, help="port to listen on (0: any free port)")


def load_model_flags(args: Any) -> tuple[AlignedModel, DecodingOptions]:
    """The model and decoding that :func:`add_model_flags`' flags chose (bad decoding flags: one line, first)."""
    decoding = DecodingOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingOptions)})
    check_decoding(decoding)
    loaded = load_for_evaluation(args.model, device=resolve_device(args.device), dtype=args.dtype)
    return AlignedModel(loaded.lm, loaded.tokenizer, loaded.control, loaded.schema), decoding


def chat_command(argv: Sequence[str]) -> int:
    """``chat --model DIR [--control NAME ...]``: a terminal conversation (:mod:`meet_lightning.inference.chat`)."""
    parser = OneLineParser(prog="meet_lightning chat", description="talk to a model, switching controls between turns")
    add_model_flags(parser, "chat")
    parser.add_argument(
        "--control", type=str, action="append", default=[], help="controls to start with (/controls changes them)"
    )
    args = parse_command(parser, argv)
    model, decoding = load_model_flags(args)
    session = ChatSession(model, decoding)
    controls = control_names(args.control)
    start = session.choose(controls)
    if controls and session.controls != controls:
        raise ConfigError(f"--control: {start}")
    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()  # each streamed piece shows at once

    run_chat(session, sys.stdin, write)
    return 0


def serve_command(argv: Sequence[str]) -> int:
    """``serve --model DIR [--host H] [--port N]``: an OpenAI-compatible endpoint (:mod:`meet_lightning.inference.serve`)."""
    parser = OneLineParser(prog="meet_lightning serve", description="an OpenAI-compatible endpoint choosing controls per request")
    add_model_flags(parser, "serve")
    add_listen_flags(parser, 8000)
    parser.add_argument("--served_name", type=str | None, default=None, help="the model id clients send (default: --model)")
    args = parse_command(parser, argv)
    model, decoding = load_model_flags(args)
    try:
        server = make_server(ControlServer(model, args.served_name or args.model, decoding), args.host, args.port)
    except OSError as error:
        raise ConfigError(f"--host {args.host} --port {args.port}: {error.strerror} — choose another port") from None
    host, port = server.server_address[:2]
    print(
        f"serving {args.served_name or args.model} at http://{host}:{port}/v1 (controls: {', '.join(model.controls) or 'none'})"
    )
    print("Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def playground_command(argv: Sequence[str]) -> int:
    """``playground --model DIR [--port N]``: answers side by side in a local web page (:mod:`meet_lightning.inference.playground`)."""
    parser = OneLineParser(prog="meet_lightning playground", description="one prompt, answers side by side per control choice")
    add_model_flags(parser, "playground")
    add_listen_flags(parser, 7860)
    args = parse_command(parser, argv)
    try:
        from meet_lightning.inference.playground import build_app
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise ConfigError("playground needs Gradio — pip install 'meet_lightning[ui]'") from None
    model, decoding = load_model_flags(args)
    app = build_app(model, decoding, args.model)
    # no share link, no analytics: nothing leaves the machine
    app.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True)
    return 0


def evaluate_command(argv: Sequence[str]) -> int:
    """``evaluate --model DIR [--data.path FILE] [--fidelity_prompts FILE.jsonl] [--reward_model DIR] [--judge SPEC] [--plots DIR]``."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the options' field docstrings are the help
    parser = OneLineParser(
        prog="meet_lightning evaluate", description="score a model: pairwise metrics, control fidelity, rewards"
    )
    add_config_flag(parser, "evaluate")
    parser.add_argument("--output", type=str | None, default=None, help="also write the metrics as JSON here")
    parser.add_argument(
        "--logger", type=str | list[str] | None, default=None,
        help="also log the metrics (and --plots) to these trackers: tensorboard, wandb, mlflow (csv: metrics.csv)",
    )  # fmt: skip
    parser.add_argument("--log_dir", type=str, default="evaluate_logs", help="where --logger writes (a run per call)")
    parser.add_class_arguments(EvaluateOptions, nested_key=None, as_group=False)
    parser.set_defaults(device=AUTO_DEVICE)
    next(a for a in parser._actions if "--device" in a.option_strings).help = DEVICE_HELP
    # `--attribute A --attribute B` appends, as the help says (a plain list flag would keep only B)
    parsed = parser.instantiate(parse_command(parser, ["--attribute+" if a == "--attribute" else a for a in argv]))
    fields = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(EvaluateOptions)}
    fields["device"] = resolve_device(fields["device"])
    tracking = Recipe(output_dir=parsed.log_dir, logger=parsed.logger) if parsed.logger else None  # its loggers only
    if tracking:
        check_loggers(tracking)  # an unknown or missing tracker: one line, before any model is loaded
    metrics = run_evaluation(EvaluateOptions(**fields))
    if tracking:
        specs = stage_loggers(tracking, "evaluate")  # log_dir/evaluate/logs/version_N, as a stage's
        loggers = [import_callable(":".join(s["class_path"].rsplit(".", 1)), "--logger")(**s["init_args"]) for s in specs]
        log_evaluation(loggers, metrics, metrics.get("plots", []))
    text = json.dumps(metrics, indent=2)
    print(text)
    if parsed.output:
        Path(parsed.output).parent.mkdir(parents=True, exist_ok=True)
        Path(parsed.output).write_text(text + "\n")
    return 0


def push_command(argv: Sequence[str]) -> int:
    """``push --model DIR --repo_id OWNER/NAME [--private] [--revision BRANCH] [--commit_message TEXT]``."""
    parser = OneLineParser(prog="meet_lightning push", description="publish an export/ folder to the Hugging Face Hub")
    add_config_flag(parser, "push")
    parser.add_argument("--model", type=str, required=True, help="an export/ folder")
    parser.add_argument("--repo_id", type=str, required=True, help="owner/name of the model repository (created when missing)")
    parser.add_argument("--private", type=bool, default=False, help="create the repository as private")
    parser.add_argument("--revision", type=str | None, default=None, help="branch to commit to (default: main)")
    parser.add_argument("--commit_message", type=str | None, default=None, help="the Hub commit's message")
    args = parse_command(parser, argv)
    url = push_export(args.model, args.repo_id, args.private, args.revision, args.commit_message)
    print(f"pushed {args.model} to {url}")
    return 0
