"""A corpus of bad inputs for the CLI: flags, recipes, checkpoints, controls files, export folders, predict files,
output folders and data files. Each case builds its files and returns the command line; running it must print
one line ``error: …`` holding every expected fragment (the flag, row or file, and the fix) and exit with code 2.

Used by ``tests/test_reliability.py::test_bad_input_gives_one_line_and_exit_2``.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = CONFIGS / "meet_hh_prompt.yaml"


@dataclass
class Context:
    """What a case may use: its own folder, the HH data file and a finished debug run (copy before changing)."""

    tmp: Path
    hh: Path
    run: Path

    def fit(self, *extra: str, command: str = "fit", out: Path | None = None) -> list[str]:
        out = out or self.tmp / "out"
        base = ["--config", str(RECIPE), "--config", str(CONFIGS / "debug.yaml"), "--data.path", str(self.hh)]
        return [command, *base, "--output_dir", str(out), *extra]

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def checkpoint(self, edit: Callable[[dict], None] | None = None, name: str = "edited.ckpt") -> Path:
        """The run's stage-1 ``last.ckpt``, edited and saved in this case's folder."""
        state = torch.load(self.run / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)
        if edit:
            edit(state)
        path = self.tmp / name
        torch.save(state, path)
        return path

    def truncated(self, source: Path, name: str) -> Path:
        data = source.read_bytes()
        return self.write(name, data[: len(data) // 2])

    def controls(self, **metadata_changes: object) -> Path:
        """The run's ``stage1/controls.safetensors`` with some metadata fields replaced."""
        source = self.run / "stage1" / "controls.safetensors"
        with safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata())
        metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata_changes.items()})
        path = self.tmp / "controls.safetensors"
        save_file(load_file(str(source)), str(path), metadata=metadata)
        return path

    def export(self) -> Path:
        """A copy of the run's export folder."""
        folder = self.tmp / "export"
        shutil.copytree(self.run / "export", folder)
        return folder

    def edit_schema(self, change: Callable[[dict], None]) -> Path:
        folder = self.export()
        schema = json.loads((folder / "meet_schema.json").read_text())
        change(schema)
        (folder / "meet_schema.json").write_text(json.dumps(schema))
        return folder

    def stage2_only(self, controls: Path | str) -> list[str]:
        return self.fit("--stage1.model", "null", "--stage2.model.init_controls", str(controls))

    def predict(self, prompts: Path | None) -> list[str]:
        """``predict`` on a copy of the finished run (stage 1), with ``prompts`` as the predict file."""
        out = self.tmp / "run"
        shutil.copytree(self.run, out)
        extra = ["--data.predict_path", str(prompts)] if prompts else []
        return self.fit("--stage", "stage1", *extra, command="predict", out=out)

    def data_case(self, case_id: str) -> list[str]:
        """A data-file case of ``test_formats.BAD_INPUTS``, through ``fit``."""
        from test_formats import BAD_INPUTS, _make_bad_input

        _, name, content, options, _ = next(case for case in BAD_INPUTS if case[0] == case_id)
        assert not options
        path = _make_bad_input(self.tmp, case_id, name, content)
        return [a if a != str(self.hh) else path for a in self.fit("--data.format", "auto", "--data.preference", "null")]


@dataclass(frozen=True)
class BadInput:
    """One bad input: ``build(context)`` returns the CLI arguments; the error line must hold ``fragments``."""

    id: str
    kind: str
    build: Callable[[Context], list[str]]
    fragments: tuple[str, ...]


class _Pickled:
    """Unpickling this would create ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def pickle_bomb(path: Path, marker: Path) -> Path:
    """A pickle file that writes ``marker`` if anything ever unpickles it."""
    path.write_bytes(pickle.dumps({"state_dict": _Pickled(marker)}))
    return path


def _edit_meet(key: str, value: object) -> Callable[[dict], None]:
    return lambda state: state["meet"].__setitem__(key, value)


OTHER_FINGERPRINT = "0123456789abcdef"

BAD_INPUTS: list[BadInput] = [
    # ------------------------------------------------------------------ flags
    BadInput("flag_typo", "flag", lambda c: c.fit("--data.max_lenght", "64"), ("did you mean --data.max_length?",)),
    BadInput(
        "flag_wrong_type",
        "flag",
        lambda c: c.fit("--data.batch_size", "abc"),
        ("--data.batch_size 'abc' is not an int", "pass an int"),
    ),
    BadInput("flag_zero_batch_size", "flag", lambda c: c.fit("--data.batch_size", "0"), ("--data.batch_size 0 must be ≥ 1",)),
    BadInput(
        "flag_negative_max_length", "flag", lambda c: c.fit("--data.max_length", "-5"), ("--data.max_length -5 is too small",)
    ),
    BadInput(
        "flag_zero_max_examples", "flag", lambda c: c.fit("--data.max_examples", "0"), ("--data.max_examples 0 must be ≥ 1",)
    ),
    BadInput(
        "flag_lr_above_range",
        "flag",
        lambda c: c.fit("--stage1.model.lr", "5"),
        ("stage1: lr 5.0 must be in (0, 1)", "set --stage1.model.lr"),
    ),
    BadInput(
        "flag_negative_stage2_lr_caught_before_stage1_trains",
        "flag",
        lambda c: c.fit("--stage2.model.lr=-1e-5"),
        ("stage2: lr -1e-05 must be in (0, 1)", "set --stage2.model.lr"),
    ),
    BadInput(
        "flag_control_lr_above_range",
        "flag",
        lambda c: c.fit("--stage2.model.control_lr", "50"),
        ("control_lr 50.0 must be in (0, 10)", "--stage2.model.control_lr"),
    ),
    BadInput(
        "flag_negative_max_steps",
        "flag",
        lambda c: c.fit("--stage1.trainer.max_steps", "-5"),
        ("--stage1.trainer.max_steps -5 must be ≥ 1",),
    ),
    BadInput(
        "flag_zero_checkpoint_interval",
        "flag",
        lambda c: c.fit("--stage2.checkpoint_every_n_steps", "0"),
        ("--stage2.checkpoint_every_n_steps 0 must be ≥ 1",),
    ),
    BadInput(
        "flag_zero_accumulation",
        "flag",
        lambda c: c.fit("--stage1.trainer.accumulate_grad_batches", "0"),
        ("--stage1.trainer.accumulate_grad_batches 0 must be ≥ 1",),
    ),
    BadInput(
        "flag_negative_val_check_interval",
        "flag",
        lambda c: c.fit("--stage1.trainer.val_check_interval", "-2"),
        ("--stage1.trainer.val_check_interval", "invalid value -2"),
    ),
    BadInput(
        "flag_unknown_precision",
        "flag",
        lambda c: c.fit("--stage1.trainer.precision", "17"),
        ("--stage1.trainer.precision '17' is not one of", "bf16-mixed", "pass one of them"),
    ),
    BadInput(
        "flag_unknown_module_class",
        "flag",
        lambda c: c.fit("--stage1.model", "meet_lightning.Nope"),
        ("--stage1.model meet_lightning.Nope: cannot import it", "package.module.Class"),
    ),
    BadInput(
        "flag_zero_control_tokens",
        "flag",
        lambda c: c.fit("--control.init_args.num_tokens", "0"),
        ("num_tokens 0 must be ≥ 1", "--control.init_args.num_tokens"),
    ),
    BadInput(
        "flag_unknown_dtype",
        "flag",
        lambda c: c.fit("--stage1.model.dtype", "float8"),
        ("stage1: dtype 'float8' is not one of", "--stage1.model.dtype"),
    ),
    BadInput(
        "flag_path_and_sources_together",
        "flag",
        lambda c: c.fit("--data.sources", json.dumps([{"path": str(c.hh)}])),
        ("--data.path and --data.sources were both given",),
    ),
    BadInput(
        "flag_missing_model_folder",
        "flag",
        lambda c: c.fit("--model_name_or_path", str(c.tmp / "no_such_model")),
        ("no_such_model does not exist", "check the path"),
    ),
    BadInput(
        "flag_stage_not_in_recipe",
        "flag",
        lambda c: c.fit("--stage", "stage3", command="validate"),
        ("--stage stage3 is not in this recipe", "stage1, stage2"),
    ),
    # ----------------------------------------------------------------- recipes
    BadInput(
        "recipe_invalid_yaml",
        "recipe",
        lambda c: c.fit("--config", str(c.write("bad.yaml", "stage1:\n  model: [unclosed\n"))),
        ("bad.yaml: not valid YAML", "line 3", "fix the file"),
    ),
    BadInput(
        "recipe_unknown_key",
        "recipe",
        lambda c: c.fit("--config", str(c.write("typo.yaml", "stage1:\n  trainer:\n    max_stepz: 3\n"))),
        ("unknown key --stage1.trainer.max_stepz", "did you mean --stage1.trainer.max_steps?"),
    ),
    BadInput(
        "recipe_wrong_type",
        "recipe",
        lambda c: c.fit("--config", str(c.write("type.yaml", "data:\n  batch_size: four\n"))),
        ("--data.batch_size 'four' is not an int",),
    ),
    BadInput(
        "recipe_not_a_mapping",
        "recipe",
        lambda c: c.fit("--config", str(c.write("list.yaml", "- stage1\n- stage2\n"))),
        ("list.yaml: a recipe is a YAML mapping",),
    ),
    BadInput(
        "recipe_missing_file",
        "recipe",
        lambda c: ["fit", "--config", str(c.tmp / "missing.yaml"), "--output_dir", str(c.tmp / "out")],
        (
            "--config",
            "missing.yaml: file not found",
        ),
    ),
    BadInput(
        "recipe_missing_output_dir",
        "recipe",
        lambda c: ["fit", "--config", str(_without_output_dir(c)), "--config", str(CONFIGS / "debug.yaml")],
        ("--output_dir", "required"),
    ),
    BadInput(
        "recipe_without_stages",
        "recipe",
        lambda c: c.fit("--stage1.model", "null", "--stage2.model", "null"),
        ("the recipe has no stage", "set stage1.model"),
    ),
    # ------------------------------------------------------------- checkpoints
    BadInput(
        "ckpt_truncated",
        "checkpoint",
        lambda c: c.fit("--ckpt_path", str(c.truncated(c.checkpoint(), "half.ckpt"))),
        ("half.ckpt: not a readable checkpoint", "pass another --ckpt_path"),
    ),
    BadInput(
        "ckpt_missing",
        "checkpoint",
        lambda c: c.fit("--ckpt_path", str(c.tmp / "nope.ckpt")),
        ("--ckpt_path", "nope.ckpt: file not found"),
    ),
    BadInput(
        "ckpt_pickle_is_never_unpickled",
        "checkpoint",
        lambda c: c.fit("--ckpt_path", str(pickle_bomb(c.tmp / "evil.ckpt", c.tmp / "UNPICKLED"))),
        ("evil.ckpt: not a readable checkpoint",),
    ),
    BadInput(
        "ckpt_not_lightning",
        "checkpoint",
        lambda c: c.fit("--ckpt_path", str(_save(c.tmp / "plain.ckpt", {"w": torch.zeros(2)}))),
        ("plain.ckpt: not a Lightning checkpoint",),
    ),
    BadInput(
        "ckpt_without_meet_metadata",
        "checkpoint",
        lambda c: c.fit("--ckpt_path", str(c.checkpoint(lambda s: s.pop("meet")))),
        ("no meet_lightning metadata",),
    ),
    BadInput(
        "ckpt_other_base_model",
        "checkpoint",
        lambda c: c.fit("--ckpt_path", str(c.checkpoint(_edit_meet("fingerprint", OTHER_FINGERPRINT)))),
        ("trained on another base model", OTHER_FINGERPRINT, "model_name_or_path"),
    ),
    BadInput(
        "ckpt_other_control_schema",
        "checkpoint",
        lambda c: c.fit("--ckpt_path", str(c.checkpoint(_edit_meet("schema", {"helpful": ["good", "bad"]})))),
        ("control schema", "helpful", "same data preferences"),
    ),
    BadInput(
        "ckpt_truncated_last_in_run_folder",
        "checkpoint",
        lambda c: _run_with_truncated_last(c),
        ("last.ckpt: not a readable checkpoint", "delete it to restart the stage"),
    ),
    BadInput(
        "ckpt_validate_before_fit",
        "checkpoint",
        lambda c: c.fit(command="validate"),
        ("last.ckpt: not found", "run `fit`"),
    ),
    # ---------------------------------------------------------- controls files
    BadInput(
        "controls_missing",
        "controls",
        lambda c: c.stage2_only(c.tmp / "none.safetensors"),
        ("none.safetensors: controls file not found", "run stage 1 first"),
    ),
    BadInput(
        "controls_not_from_stage1",
        "controls",
        lambda c: c.stage2_only(c.run / "export" / "model.safetensors"),
        ("model.safetensors: not a meet_lightning controls file", "stage1/controls.safetensors"),
    ),
    BadInput(
        "controls_other_base_model",
        "controls",
        lambda c: c.stage2_only(c.controls(fingerprint=OTHER_FINGERPRINT)),
        ("trained on another base model", OTHER_FINGERPRINT, "same model_name_or_path"),
    ),
    BadInput(
        "controls_other_schema",
        "controls",
        lambda c: c.stage2_only(c.controls(schema={"helpful": ["good", "bad"]})),
        ("control schema", "helpful", "train stage 1 on the same preferences"),
    ),
    BadInput(
        "controls_truncated",
        "controls",
        lambda c: c.stage2_only(c.truncated(c.run / "stage1" / "controls.safetensors", "half.safetensors")),
        ("half.safetensors: not a readable safetensors file", "re-run stage 1"),
    ),
    # ----------------------------------------------------------- export folders
    BadInput(
        "export_without_schema",
        "export",
        lambda c: _generate(_without(c.export(), "meet_schema.json")),
        ("no meet_schema.json", "pass the export/ folder"),
    ),
    BadInput(
        "export_schema_not_json",
        "export",
        lambda c: _generate(_overwrite(c.export(), "meet_schema.json", "{not json")),
        ("meet_schema.json: not valid JSON", "export the run again"),
    ),
    BadInput(
        "export_schema_missing_fields",
        "export",
        lambda c: _generate(c.edit_schema(lambda s: s.pop("preferences"))),
        ("missing or wrong fields: preferences", "export the run again"),
    ),
    BadInput(
        "export_foreign_control_class",
        "export",
        lambda c: _generate(c.edit_schema(lambda s: s.__setitem__("control", {"class_path": "os.system", "init_args": {}}))),
        ("'os.system' is not a meet_lightning control",),
    ),
    BadInput(
        "export_folder_missing",
        "export",
        lambda c: _generate(c.tmp / "no_export"),
        ("no_export: not a folder",),
    ),
    BadInput(
        "export_pickle_weights_only",
        "export",
        lambda c: _generate(_pickle_only(c)),
        ("no model.safetensors", "pickle weights are never loaded"),
    ),
    BadInput(
        "export_truncated_controls",
        "export",
        lambda c: _generate(_truncate_in(c.export(), "controls.safetensors")),
        ("controls.safetensors: not a readable safetensors file",),
    ),
    BadInput(
        "export_unknown_control",
        "export",
        lambda c: _generate(c.run / "export", control="polite"),
        ("control 'polite' is unknown", "harmless/good"),
    ),
    BadInput(
        "export_generate_zero_tokens",
        "export",
        lambda c: [*_generate(c.run / "export"), "--max_new_tokens", "0"],
        ("--max_new_tokens 0 must be ≥ 1",),
    ),
    # ------------------------------------------------------------ predict files
    BadInput(
        "predict_empty_file", "predict", lambda c: c.predict(c.write("p.jsonl", "\n")), ("p.jsonl: no prompts in the file",)
    ),
    BadInput("predict_without_path", "predict", lambda c: c.predict(None), ("predict needs --data.predict_path",)),
    BadInput(
        "predict_bad_line",
        "predict",
        lambda c: c.predict(c.write("p.jsonl", '{"prompt": "hi"}\n{"prompt": \n')),
        ("p.jsonl:2: not a JSON object",),
    ),
    BadInput(
        "predict_unknown_control",
        "predict",
        lambda c: c.predict(c.write("p.jsonl", '{"prompt": "hi", "controls": "polite"}\n')),
        ("p.jsonl:1: control 'polite' is unknown", "harmless/good"),
    ),
    # ----------------------------------------------------------- output folders
    BadInput(
        "output_dir_is_a_file",
        "output",
        lambda c: c.fit(out=c.write("taken", "x")),
        ("--output_dir", "taken is a file", "pass a folder path"),
    ),
    BadInput(
        "output_dir_under_a_file",
        "output",
        lambda c: c.fit(out=c.write("taken", "x") / "run"),
        ("taken is a file",),
    ),
    BadInput(
        "output_dir_holds_another_recipe",
        "output",
        lambda c: c.fit("--data.batch_size", "2", out=_copy_run(c)),
        ("holds a run of another recipe", "data.batch_size: 4 → 2", "--overwrite"),
    ),
    # -------------------------------------------------------------- data files
    BadInput(
        "data_mixing_formats",
        "data",
        lambda c: c.data_case("mixed_formats"),
        ("x.jsonl:2:", "looks like format sharegpt, not pairwise", "one source per format"),
    ),
    BadInput("data_missing_file", "data", lambda c: c.data_case("missing_path"), ("nope.jsonl: no such file", "--data.path")),
    BadInput("data_undecodable", "data", lambda c: c.data_case("undecodable_line"), ("u.jsonl:2:", "UTF-8")),
]


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _generate(folder: Path, control: str = "good") -> list[str]:
    return ["generate", "--model", str(folder), "--control", control, "--prompt", "Hi", "--max_new_tokens", "2"]


def _without(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _overwrite(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder


def _truncate_in(folder: Path, name: str) -> Path:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    return folder


def _pickle_only(c: Context) -> Path:
    folder = _without(c.export(), "model.safetensors")
    pickle_bomb(folder / "pytorch_model.bin", c.tmp / "UNPICKLED")
    return folder


def _copy_run(c: Context) -> Path:
    out = c.tmp / "run"
    shutil.copytree(c.run, out)
    return out


def _run_with_truncated_last(c: Context) -> list[str]:
    """A run folder whose stage 1 is unfinished and whose last.ckpt was cut in half (not by us: we write atomically)."""
    out = c.tmp / "run"
    (out / "stage1" / "checkpoints").mkdir(parents=True)
    shutil.copy(c.run / "recipe.yaml", out / "recipe.yaml")
    c.truncated(c.run / "stage1" / "checkpoints" / "last.ckpt", "run/stage1/checkpoints/last.ckpt")
    return c.fit(out=out)


def _without_output_dir(c: Context) -> Path:
    lines = RECIPE.read_text().splitlines(keepends=True)
    return c.write("no_output.yaml", "".join(line for line in lines if not line.startswith("output_dir:")))
