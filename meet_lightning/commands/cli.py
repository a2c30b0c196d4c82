"""Command line: ``python -m meet_lightning COMMAND ...``.

``fit`` / ``validate`` / ``test`` / ``predict`` read a recipe (see ``configs/``); ``generate``, ``evaluate``,
``push``, ``inspect-data`` and ``download-model`` are small tools around it. Bad input prints one ``error: ...`` line
and exits with code 2; an internal bug keeps its traceback (exit code 1).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from meet_lightning import __version__
from meet_lightning.errors import ConfigError, MeetError

if TYPE_CHECKING:  # imported where used: --help and --version stay fast
    from meet_lightning.recipe import Recipe

COMMANDS_HELP = {
    "fit": "train every stage of a recipe (resumes when re-run), then export",
    "validate": "validation metrics of one stage's last checkpoint (--stage)",
    "test": "test metrics of one stage's last checkpoint (--stage)",
    "predict": "generate for data.predict_path with one stage's last checkpoint",
    "generate": "generate a response from an exported model under chosen controls",
    "chat": "talk to a model in the terminal, switching controls between turns",
    "serve": "an OpenAI-compatible HTTP endpoint; each request chooses its controls",
    "playground": "a local web page: one prompt, answers side by side per control choice",
    "evaluate": "score an exported or plain Hugging Face model on pairwise data",
    "push": "publish an export/ folder to the Hugging Face Hub",
    "inspect-data": "read a data file and report formats, counts, drops and lengths",
    "download-model": "fetch and convert the offline default model once",
    "demo": "train SmolLM2 to answer concisely or in detail on request, then compare",
}


class OneLineParser(ArgumentParser):
    """An ArgumentParser whose errors are one line with a did-you-mean, exit code 2 (not a page of usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # argparse would take --max_step for --max_steps
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise ConfigError(one_line(message, self.known_flags()))

    def known_flags(self) -> list[str]:
        """Every dotted flag the parser accepts."""
        return [opt for action in self._actions for opt in action.option_strings if opt.startswith("--")]


def one_line(message: str, known: Sequence[str]) -> str:
    """Shortens a jsonargparse message to one line naming the flag, what was wrong and the fix.

    Bad values (``Parser key "data.batch_size": Expected a <class 'int'>…``) become
    ``--data.batch_size 'abc' is not an int — pass an int``; unknown keys get the closest known flag.
    """
    described = describe_bad_value(message.strip())
    if described:
        return described
    group = re.match(r"Group '([\w.]+)' does not accept option '(\w+)'", message.strip())
    if group:
        flag = f"--{group.group(1)}.{group.group(2)}"
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return f"unknown key {flag} in the recipe" + (f" — did you mean {close[0]}?" if close else " — check its spelling")
    required = re.match(r"the following arguments are required: ([\w., ]+)", message.strip())
    if required:
        names = [f"--{n.strip().lstrip('-')}" for n in required.group(1).split(",")]
        return f"{', '.join(names)} is required — pass {names[0]} or set it in the recipe YAML"
    text = " ".join(message.strip().split("\n")[0].split())
    keys = re.findall(r"(?:--)?([A-Za-z_][\w.]*)", text)
    unknown = [k for k in keys if f"--{k}" not in known and "." in k]
    close = difflib.get_close_matches(f"--{unknown[0]}", known, n=1, cutoff=0.6) if unknown else []
    return f"{text} — did you mean {close[0]}?" if close else text


_TYPE_NAMES = {"int": "an int", "float": "a number", "str": "text", "bool": "true or false", "dict": "a mapping"}


def describe_bad_value(message: str) -> str | None:
    """One line for jsonargparse's ``Parser key "KEY": …`` messages (a value of the wrong type or choice)."""
    key = re.match(r'Parser key "([\w.]+)":', message)
    if not key:
        return None
    flag = f"--{key.group(1)}"
    missing_file = re.search(r"File does not exist: '([^']+)'", message)
    if missing_file:
        return f"{flag} {missing_file.group(1)}: file not found — check the path"
    given = re.search(r"(?:Given|Got) value: (.*)", message)
    value = given.group(1).strip() if given else None
    bad_class = re.search(r"Problem with given class_path '([^']+)':\s*(.+)", message)
    if bad_class:
        return (
            f"{flag} {bad_class.group(1)}: cannot import it ({bad_class.group(2).strip()}) — pass the full import path"
            " of a subclass (package.module.Class)"
        )
    choices = [c.strip().strip("'") for group in re.findall(r"Literal\[([^\]]*)\]", message) for c in group.split(",")]
    types = [_TYPE_NAMES.get(t, t) for t in re.findall(r"Expected a <class '(\w+)'>", message) if t != "NoneType"]
    expected = f"one of {', '.join(dict.fromkeys(choices))}" if choices else " or ".join(dict.fromkeys(types)) or None
    if expected is None:
        return f"{flag}: {' '.join(message.split())[len(key.group(0)) :].strip()}"
    shown = f" {value!r}" if value is not None else ""
    return f"{flag}{shown} is not {expected} — pass {'one of them' if choices else expected} to {flag}"


def check_config_files(argv: Sequence[str]) -> None:
    """ConfigError naming the file, line and column for a ``--config`` that is not valid YAML or not a mapping."""
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            continue  # jsonargparse reports a missing file (or takes inline YAML)
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path}: not UTF-8 text — save the recipe as UTF-8 YAML") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ConfigError(f"--config {path}: not valid YAML ({problem}{where}) — fix the file") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"--config {path}: a recipe is a YAML mapping (key: value), not a {type(loaded).__name__} — see configs/"
            )


# ------------------------------------------------------------------- recipes
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # meet_lightning/


def recipes_dir() -> Path:
    """The shipped recipes: ``meet_lightning/recipes`` in an installed wheel, ``configs/`` in a checkout."""
    installed = PACKAGE_DIR / "recipes"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "configs"


def shipped_recipes() -> list[str]:
    """Names ``--config`` accepts without a path: ``demo``, ``baselines/dpo`` …"""
    root = recipes_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config_names(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--config NAME`` that is not a file replaced by the shipped recipe of that name.

    ``demo``, ``demo.yaml`` and ``configs/demo.yaml`` all name ``configs/demo.yaml``, so the commands a
    checkout's README shows also work after ``pip install`` from any folder. Inline YAML passes unchanged.
    """
    resolved = list(argv)
    for i, arg in enumerate(resolved[:-1]):
        value = resolved[i + 1]
        if arg != "--config" or os.path.exists(value) or any(c in value for c in ":{\n"):
            continue
        name = value.removeprefix("configs/").removesuffix(".yaml")
        if name not in shipped_recipes():
            raise ConfigError(
                f"--config {value}: file not found, and no shipped recipe has that name — pass a path, or one of: {', '.join(shipped_recipes())}"
            )
        resolved[i + 1] = str(recipes_dir() / f"{name}.yaml")
    return resolved


def resolve_packaged_paths(recipe: dict[str, Any]) -> None:
    """Data paths such as ``meet_lightning/demo_data/…`` (a shipped recipe's data) found in the installed
    package when they are not found from the working folder."""
    data = recipe.get("data") or {}
    holders = [data, *(s for s in data.get("sources") or [] if isinstance(s, dict))]
    for holder in holders:
        for key in ("path", "predict_path"):
            value = holder.get(key)
            if isinstance(value, str) and value.startswith("meet_lightning/") and not os.path.exists(value):
                packaged = PACKAGE_DIR.parent / value
                holder[key] = str(packaged) if packaged.exists() else value


# ------------------------------------------------------------------- one switch for both stages
STAGES = ("stage1", "stage2")
SHARED_TRAINER_FLAGS = {"--devices": "devices", "--accelerator": "accelerator"}
"""Top-level flags (and recipe keys) for every stage's trainer: ``--devices 2`` is ``--trainer.devices 2``."""
SHARED_TRAINER_HELP = (
    "--trainer.KEY VALUE sets KEY (any key of --stage1.trainer, e.g. --trainer.max_steps 3, --trainer.precision"
    " bf16-mixed) in both stages' trainers, where it stands: a stage's own value given after it, or in the same"
    " YAML file, wins. --devices N and --accelerator NAME are --trainer.devices and --trainer.accelerator. In a"
    " recipe: a top-level trainer: block (and devices: / accelerator: keys)."
)
LoggerName = Literal["csv", "tensorboard", "wandb", "mlflow"]
"""What ``--logger`` accepts (see ``training.loggers.LOGGERS``)."""
SelectName = Literal["last", "best"]
"""What ``--stageN.select`` accepts."""


def trainer_keys(parser: OneLineParser) -> list[str]:
    """The keys of a stage's trainer (``max_steps``, ``precision`` …): what ``--trainer.KEY`` may name."""
    prefix = "--stage1.trainer."
    return sorted({f[len(prefix) :].split(".")[0].rstrip("+") for f in parser.known_flags() if f.startswith(prefix)})


def check_trainer_key(key: str, keys: Sequence[str], shown: str, where: str = "") -> None:
    """ConfigError unless ``key`` (its first part) is a trainer key; ``shown`` is how the user wrote it, ``where``
    the file it is in."""
    name = key.split(".")[0].rstrip("+")
    if name in keys:
        return
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    fix = f"did you mean {shown.replace(name, close[0], 1)}?" if close else "use a key of --stage1.trainer (see fit --help)"
    raise ConfigError(f"unknown key {shown}{where} — {fix}")


def expand_shared_flags(argv: Sequence[str], keys: Sequence[str]) -> list[str]:
    """``argv`` with each ``--trainer.KEY VALUE`` (and ``--devices``/``--accelerator``) written out for both stages.

    Expanded in place, so the usual rule holds: what comes later wins. ``--trainer.max_steps 3`` after a recipe
    overrides the recipe's per-stage values; ``--stage1.trainer.max_steps 5`` after it wins for stage 1.
    """
    expanded: list[str] = []
    i = 0
    while i < len(argv):
        flag, has_value, value = argv[i].partition("=")
        key = SHARED_TRAINER_FLAGS.get(flag) or (flag.removeprefix("--trainer.") if flag.startswith("--trainer.") else None)
        if key is None:
            expanded.append(argv[i])
            i += 1
            continue
        check_trainer_key(key, keys, flag)
        if not has_value:
            if i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a value — e.g. {flag} VALUE")
            value = argv[i + 1]
        i += 1 if has_value else 2
        for stage in STAGES:
            expanded += [f"--{stage}.trainer.{key}", value]
    return expanded


def merge_shared_trainer(recipe: dict[str, Any], path: str, keys: Sequence[str]) -> bool:
    """Writes a recipe file's top-level ``trainer:`` block (and ``devices:``/``accelerator:``) into each stage's
    trainer, where the stage's own keys win; returns whether the file had any."""
    shared = {key: recipe.pop(flag[2:]) for flag, key in SHARED_TRAINER_FLAGS.items() if flag[2:] in recipe}
    block = recipe.pop("trainer", None)
    if block is None and not shared:
        return False
    if not isinstance(block, dict | None):
        raise ConfigError(
            f"--config {path}: trainer: is a mapping of trainer keys (e.g. trainer: {{max_steps: 300}}) — fix the file"
        )
    shared.update(block or {})
    for key in shared:
        check_trainer_key(key, keys, f"trainer.{key}", f" in {path}")
    for stage in STAGES:
        spec = recipe.get(stage) or {}
        if isinstance(spec, dict):
            recipe[stage] = {**spec, "trainer": {**shared, **(spec.get("trainer") or {})}}
    return True


def expand_shared_trainer(argv: Sequence[str], parser: OneLineParser) -> list[str]:
    """``argv`` with the switches for both stages written out per stage: on the command line
    (:func:`expand_shared_flags`) and in each ``--config`` file (:func:`merge_shared_trainer`, the file then
    passed as the merged YAML text)."""
    keys = trainer_keys(parser)
    argv = expand_shared_flags(argv, keys)
    for i, arg in enumerate(argv[:-1]):
        path = argv[i + 1]
        if arg != "--config" or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
        if isinstance(recipe, dict) and merge_shared_trainer(recipe, path, keys):
            argv[i + 1] = yaml.safe_dump(recipe, sort_keys=False)
    return argv


def recipe_parser(command: str) -> OneLineParser:
    """The recipe parser: top-level keys, the control, the data and both stages."""
    from lightning import Trainer

    from meet_lightning.controls.tokens import ControlTokens
    from meet_lightning.data.datamodule import PreferenceDataModule
    from meet_lightning.inference.generation import DecodingOptions
    from meet_lightning.modules.base import MeetModule
    from meet_lightning.precision import AUTO, Precision
    from meet_lightning.recipe import DEFAULT_LOGGERS, Recipe, StageSpec

    parser = OneLineParser(prog=f"meet_lightning {command}", description=COMMANDS_HELP[command])
    parser.add_argument("--config", action=ActionConfigFile, help="recipe YAML; repeat to overlay")
    parser.add_argument(
        "--seed_everything", type=int, default=Recipe.seed_everything, help="seed applied before each stage's module is built"
    )
    parser.add_argument("--output_dir", type=str, required=True, help="folder holding stage1/ stage2/ export/")
    parser.add_argument(
        "--model_name_or_path", type=str, default=Recipe.model_name_or_path, help="hub id, local folder, .gguf file or alias"
    )
    parser.add_argument(
        "--logger",
        type=LoggerName | list[LoggerName],
        default=list(DEFAULT_LOGGERS),
        help="experiment trackers of both stages, one or a list ('[tensorboard, wandb]'); csv is always kept (done.json"
        " and the reports read it); wandb and mlflow need their package (pip install 'meet_lightning[tracking]')",
    )
    parser.add_argument_group("both stages", description=SHARED_TRAINER_HELP)
    parser.add_subclass_arguments(ControlTokens, "control", required=False, help="control implementation shared by both stages")
    parser.add_class_arguments(PreferenceDataModule, "data", skip={"model_name_or_path"}, instantiate=False)
    list_format_choices(parser)
    parser.add_class_arguments(DecodingOptions, "predict", instantiate=False, help="decoding of the predict command")
    for stage in ("stage1", "stage2"):
        parser.add_subclass_arguments(
            MeetModule,
            f"{stage}.model",
            skip={"model_name_or_path", "control", "control_schema"},
            required=False,
            instantiate=False,
        )
        parser.add_class_arguments(
            Trainer, f"{stage}.trainer", instantiate=False, fail_untyped=False, sub_configs=True, skip={"precision"}
        )
        parser.add_argument(
            f"--{stage}.trainer.precision",
            type=Precision,
            default=AUTO,
            help="auto: bf16-mixed where the device computes bf16 natively, else 32-true (16-mixed on GPUs without bf16)",
        )
        parser.add_argument(
            f"--{stage}.select",
            type=SelectName,
            default=StageSpec.select,
            help="controls written after the stage: last checkpoint or best val/control_accuracy",
        )
        parser.add_argument(
            f"--{stage}.checkpoint_every_n_steps",
            type=int,
            default=StageSpec.checkpoint_every_n_steps,
            help="save last.ckpt every N optimizer steps",
        )
    if command == "fit":
        parser.add_argument("--overwrite", type=bool, default=False, help="start over in an output_dir holding another recipe")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume the first unfinished stage from this file")
    else:
        parser.add_argument("--stage", type=str | None, default=None, help="stage1 or stage2 (default: the last stage)")
    return parser


def list_format_choices(parser: OneLineParser) -> None:
    """``--data.format``'s help lists the formats there are (read from the registry: a new format shows itself)."""
    from meet_lightning.data.formats import FORMATS

    action = next(a for a in parser._actions if "--data.format" in a.option_strings)
    action.help = f"format of path: one of {', '.join(('auto', *FORMATS))} (auto detects it)"


def parse_recipe(command: str, argv: Sequence[str]) -> tuple[Recipe, Any]:
    """Parses a recipe (``--print_config`` prints it and exits inside the parser); the recipe and the command's
    own flags (``overwrite``, ``ckpt_path``, ``stage``)."""
    from meet_lightning.recipe import Recipe

    parser = recipe_parser(command)
    argv = resolve_config_names(argv)
    check_config_files(argv)
    argv = expand_shared_trainer(argv, parser)
    try:
        cfg = parser.parse_args(argv)
    except ConfigError:
        raise
    except Exception as error:  # jsonargparse reports bad values as exceptions carrying its message
        raise ConfigError(one_line(str(error), parser.known_flags())) from None
    recipe = yaml.safe_load(parser.dump(cfg, skip_check=True))
    for key in ("config", "overwrite", "ckpt_path", "stage"):
        recipe.pop(key, None)
    resolve_packaged_paths(recipe)
    # Checked here, before any command creates output_dir: a refused run leaves nothing behind.
    check_seed(recipe.get("seed_everything"))
    if getattr(cfg, "overwrite", False):
        check_no_links(recipe["output_dir"])
    return Recipe.from_dict(recipe), cfg


SEED_RANGE = (0, 2**32 - 1)
"""Seeds ``seed_everything`` accepts (NumPy's): anything else would fail inside Lightning, after output_dir exists."""

OVERWRITTEN = ("stage1", "stage2", "export", "recipe.yaml")
"""What ``--overwrite true`` deletes inside output_dir (``training.checks.check_output_dir``)."""


def check_seed(seed: Any) -> None:
    """ConfigError unless ``seed`` is an int in :data:`SEED_RANGE`."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise ConfigError(f"--seed_everything {seed!r} is out of range — pass an integer from {low} to {high}")


def check_no_links(output_dir: str) -> None:
    """ConfigError when ``--overwrite true`` would delete through a symbolic link: ``output_dir`` itself, or a stage,
    export or recipe inside it, is a link. Deleting would then remove (or fail on) what the link points to."""
    out = Path(output_dir)
    for path in (out, *(out / name for name in OVERWRITTEN)):
        if path.is_symlink():
            raise ConfigError(
                f"--overwrite true: {path} is a symbolic link (to {os.readlink(path)}) — nothing deleted; remove the link"
                " or pass --output_dir a real folder"
            )


def run_recipe_command(command: str, argv: Sequence[str], callbacks: Sequence[Any] = ()) -> int:
    """``fit`` / ``validate`` / ``test`` / ``predict``; ``callbacks`` (Lightning callbacks) join fit's trainers."""
    from meet_lightning.training import pipeline

    recipe, cfg = parse_recipe(command, argv)  # --print_config prints and exits inside the parser
    if not recipe.active_stages:
        raise ConfigError("the recipe has no stage: set stage1.model (and stage2.model for two stages)")
    if command == "fit":
        pipeline.fit(recipe, overwrite=cfg.overwrite, ckpt_path=cfg.ckpt_path, callbacks=callbacks)
    else:
        pipeline.evaluate_stage(recipe, command, cfg.stage)
    return 0


# ------------------------------------------------------------------- tools
def run_download_model(argv: Sequence[str]) -> int:
    """``download-model NAME``: fetch and convert the offline default model."""
    from meet_lightning.models import DEFAULT_MODEL, download_model

    parser = OneLineParser(prog="meet_lightning download-model", description=COMMANDS_HELP["download-model"])
    parser.add_argument("name", type=str, nargs="?", default=DEFAULT_MODEL, help="model alias")
    args = parser.parse_args(list(argv))
    print(download_model(args.name))
    return 0


def run_inspect_data(argv: Sequence[str]) -> int:
    """``inspect-data``: what a data file turns into, and why rows were dropped."""
    from meet_lightning.commands.inspect_data import inspect_data
    from meet_lightning.data.formats import SourceConfig

    parser = OneLineParser(prog="meet_lightning inspect-data", description=COMMANDS_HELP["inspect-data"])
    parser.add_class_arguments(SourceConfig, "data", instantiate=False)
    parser.add_argument("--model", type=str | None, default=None, help="tokenizer for token lengths (default: whitespace words)")
    parser.add_argument(
        "--max_length", type=int, default=512, help="count rows too long to train at this many tokens (with --model)"
    )
    parser.add_argument(
        "--cache_dir", type=str | None, default=None, help="tokenized-data cache (default $HF_DATASETS_CACHE/meet_lightning)"
    )
    args = parser.parse_args(list(argv))
    print(inspect_data(SourceConfig(**vars(args.data)), args.model, args.max_length, args.cache_dir))
    return 0


def lazy(module: str, function: str) -> Callable[[Sequence[str]], int]:
    """A command implemented in another module, imported only when used (keeps ``--help`` fast)."""
    return lambda argv: getattr(__import__(f"meet_lightning.{module}", fromlist=[function]), function)(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    **{name: functools.partial(run_recipe_command, name) for name in ("fit", "validate", "test", "predict")},
    "generate": lazy("commands.inference", "generate_command"),
    "chat": lazy("commands.inference", "chat_command"),
    "serve": lazy("commands.inference", "serve_command"),
    "playground": lazy("commands.inference", "playground_command"),
    "evaluate": lazy("commands.inference", "evaluate_command"),
    "push": lazy("commands.inference", "push_command"),
    "inspect-data": run_inspect_data,
    "download-model": run_download_model,
    "demo": lazy("commands.demo", "demo_command"),
}


def quiet_libraries() -> None:
    """Keeps the terminal for our own lines: no per-file weight-loading bars, no library tips."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # its read errors reach the user as our own one line
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warning when data loader workers start
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())


def usage() -> str:
    """The top-level help: every command with one line."""
    lines = ["usage: python -m meet_lightning COMMAND [--help] ...   (--version: the library version)", "", "commands:"]
    lines += [f"  {name:<15} {text}" for name, text in COMMANDS_HELP.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[Any] = ()) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input). Internal errors propagate (exit code 1).

    Args:
        argv: The command line without the program (default: ``sys.argv[1:]``).
        callbacks: Lightning callbacks added to every stage's trainer of a ``fit`` (from Python only, e.g. the
            tests' :class:`~meet_lightning.training.reliability.FaultInjection`); not written into the recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if callbacks and argv[:1] != ["fit"]:
        raise ValueError(f"callbacks apply to the fit command only, not {argv[:1]}")
    if not argv:  # a command is missing: the list of them, as a usage error
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"meet_lightning {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    quiet_libraries()
    try:
        if command is None:
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            raise ConfigError(
                f"unknown command {argv[0]!r}"
                + (f" — did you mean {close[0]}?" if close else f" — use one of: {', '.join(COMMANDS)}")
            )
        return run_recipe_command("fit", argv[1:], callbacks) if callbacks else command(argv[1:])
    except MeetError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
