"""The modules' paths before the folders still import, for one release: the same module, with a warning."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings

import pytest
from safetensors.torch import load_file, save_file

from meet_lightning._moved import MOVED
from meet_lightning.commands.cli import parse_recipe
from meet_lightning.controls.files import load_controls, read_controls_metadata, save_controls
from meet_lightning.controls.tokens import PromptTuningControl, TextControl, build_control
from meet_lightning.data.rows import ControlSchema
from meet_lightning.errors import CheckpointError
from meet_lightning.training.checks import recipe_difference


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_moved_module_and_warns_with_the_new_path(old):
    new = importlib.import_module(f"meet_lightning.{MOVED[old]}")
    sys.modules.pop(f"meet_lightning.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"moved to meet_lightning.{MOVED[old]}"):
        moved = importlib.import_module(f"meet_lightning.{old}")
    assert moved is new


def test_the_old_data_modules_names_warn_and_a_data_submodule_does_not_import_lightning():
    with pytest.warns(DeprecationWarning, match="meet_lightning.data.PreferenceDataModule moved to"):
        from meet_lightning.data import PreferenceDataModule
    assert PreferenceDataModule.__module__ == "meet_lightning.data.datamodule"
    code = "import sys; from meet_lightning.data import formats; print('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_old_imports_and_names_in_a_fresh_interpreter():
    """What a user's script or an old recipe does: ``from`` an old module, and the old data module's names."""
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from meet_lightning.control import PromptTuningControl\n"
        "from meet_lightning.data import PreferenceDataModule\n"
        "from meet_lightning import pipeline\n"
        "import meet_lightning.controls.tokens as tokens, meet_lightning.data.datamodule as dm\n"
        "print(PromptTuningControl is tokens.PromptTuningControl, PreferenceDataModule is dm.PreferenceDataModule,"
        " pipeline.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "meet_lightning.training.pipeline"]


def test_a_recipe_naming_classes_by_their_old_paths_still_parses(tmp_path):
    old_paths = ["--stage1.model", "meet_lightning.modules.stage1.ControlTokenModule",
                 "--control", "meet_lightning.control.PromptTuningControl"]  # fmt: skip
    sys.modules.pop("meet_lightning.control", None)  # as in a fresh process, where the first import warns
    with pytest.warns(DeprecationWarning, match="meet_lightning.control moved"):
        recipe, _ = parse_recipe("fit", ["--output_dir", str(tmp_path), *old_paths])
    module, _, name = recipe.control["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is PromptTuningControl


def test_a_run_started_before_the_move_resumes_its_class_paths_compare_by_the_new_names():
    control = {"class_path": "meet_lightning.controls.tokens.PromptTuningControl", "init_args": {"num_tokens": 4}}
    before = {"control": {**control, "class_path": "meet_lightning.control.PromptTuningControl"}}
    assert recipe_difference(before, {"control": control}) == ""
    other = {"control": {**control, "class_path": "meet_lightning.controls.tokens.LoRAControl"}}
    assert "class_path" in recipe_difference(before, other)


def test_controls_written_before_the_move_load_without_a_warning(tmp_path):
    """An export from before the move names its control ``meet_lightning.control.TextControl``: the same class, so
    stage 2 and inference load it (this raised "use the same control settings in both stages" before)."""
    schema = ControlSchema({"length": ("concise", "verbose")})
    control = TextControl({"concise": "Briefly:", "verbose": "In detail:"})
    path = tmp_path / "controls.safetensors"
    save_controls(control, path, schema, "f" * 16)
    metadata = read_controls_metadata(path)
    old = {**json.loads(metadata["control"]), "class_path": "meet_lightning.control.TextControl"}
    save_file(load_file(str(path)), str(path), metadata={**metadata, "control": json.dumps(old)})
    sys.modules.pop("meet_lightning.control", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_controls(TextControl({"concise": "Briefly:", "verbose": "In detail:"}), path, schema, "f" * 16)
        assert isinstance(build_control(old), TextControl)
    with pytest.raises(CheckpointError, match="same control settings"):
        load_controls(TextControl({"concise": "Short:", "verbose": "In detail:"}), path, schema, "f" * 16)
