"""Shipped recipes: ``--config NAME`` resolves to the package's recipes, in a checkout and in an installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from meet_lightning.commands.cli import main, parse_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]


def test_every_yaml_under_configs_is_a_shipped_recipe():
    on_disk = sorted(str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").rglob("*.yaml"))
    assert shipped_recipes() == on_disk and "demo" in on_disk and "baselines/dpo" in on_disk


def test_config_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ and no meet_lightning/demo_data here
    for name in ("demo", "demo.yaml", "configs/demo.yaml"):
        recipe, _ = parse_recipe("fit", ["--config", name, "--config", "debug"])
        assert Path(recipe.data["path"]).is_file(), name  # the demo data, found in the package
        assert recipe.data["format"] == "multi_response" and recipe.model_name_or_path == "tiny-debug"


def test_an_unknown_config_name_lists_the_shipped_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "dmeo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config dmeo: file not found" in err and "baselines/dpo" in err


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    return next(out.glob("meet_lightning-*.whl"))


def test_the_wheel_carries_the_recipes_and_the_demo_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"meet_lightning/recipes/demo.yaml", "meet_lightning/recipes/baselines/dpo.yaml"} <= names
    assert "meet_lightning/demo_data/length_train.jsonl" in names


def test_an_installed_wheel_runs_a_shipped_recipe_by_name_outside_a_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    subprocess.run(
        [sys.executable, "-m", "meet_lightning", "fit", "--config", "demo", "--config", "debug", "--data.max_length", "1280", "--output_dir", "run"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    recipe = yaml.safe_load((work / "run" / "recipe.yaml").read_text())
    assert recipe["data"]["path"] == str(site / "meet_lightning" / "demo_data" / "length_train.jsonl")
    assert (work / "run" / "export" / "model.safetensors").is_file()
