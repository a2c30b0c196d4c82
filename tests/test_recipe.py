"""The typed recipe: one home for its defaults and checks, and a plain form that round-trips."""

from __future__ import annotations

import pytest
import yaml

from meet_lightning.commands.cli import parse_recipe, shipped_recipes
from meet_lightning.errors import ConfigError
from meet_lightning.inference.generation import DecodingOptions
from meet_lightning.recipe import Recipe, StageSpec


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_parses_to_a_recipe_whose_plain_form_round_trips(name, tmp_path):
    recipe, _ = parse_recipe("fit", ["--config", name, "--output_dir", str(tmp_path / "run")])
    assert isinstance(recipe, Recipe) and isinstance(recipe.stage1, StageSpec) and isinstance(recipe.predict, DecodingOptions)
    assert recipe.out == tmp_path / "run"  # overlays (debug, strategies/*) have no stage of their own
    plain = yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False))  # as recipe.yaml holds it
    assert Recipe.from_dict(plain) == recipe


def test_the_parsers_defaults_are_the_recipes_own(tmp_path):
    """One home for each default: the parser takes them from the dataclasses (before, cli.py and pipeline.py
    each held their own copy)."""
    recipe, _ = parse_recipe("fit", ["--output_dir", str(tmp_path), "--stage1.model", "ControlTokenModule"])
    default = Recipe(str(tmp_path))
    for key in ("model_name_or_path", "seed_everything", "logger", "control"):
        assert getattr(recipe, key) == getattr(default, key), key
    assert (recipe.stage1.select, recipe.stage1.checkpoint_every_n_steps) == (
        StageSpec.select,
        StageSpec.checkpoint_every_n_steps,
    )
    assert recipe.predict == DecodingOptions() and recipe.active_stages == ["stage1"]


def test_a_recipe_from_a_plain_mapping_fills_defaults_and_refuses_unknown_keys():
    recipe = Recipe.from_dict({"output_dir": "runs/x", "stage1": {"model": {"class_path": "ControlTokenModule"}}})
    assert recipe.stage1.select == "last" and recipe.stage2 == StageSpec() and recipe.active_stages == ["stage1"]
    assert recipe.logger_names == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match="recipe key 'stage3' is not one of"):
        Recipe.from_dict({"output_dir": "runs/x", "stage3": {}})


def test_stage_problems_name_every_bad_setting_and_its_flag():
    spec = StageSpec(
        model={"class_path": "ControlTokenModule"},
        trainer={"max_steps": 0, "accumulate_grad_batches": 0, "gradient_clip_val": -1.0},
        select="first",
        checkpoint_every_n_steps=0,
    )
    problems = spec.problems("stage2")
    assert len(problems) == 5 and all(p.startswith("--stage2.") for p in problems), problems
    assert StageSpec(model={"class_path": "x"}, trainer={"max_steps": -1}).problems("stage1") == []
