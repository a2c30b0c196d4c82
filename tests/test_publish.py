"""The model card's Hub metadata and ``push``: everything up to the network call (a fake Hub client records it)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

from meet_lightning.commands.cli import main
from meet_lightning.controls.tokens import LoRAControl, PromptTuningControl
from meet_lightning.data.rows import ControlSchema
from meet_lightning.errors import ConfigError
from meet_lightning.inference import publish
from meet_lightning.inference.export import export_model
from meet_lightning.inference.model_card import combined_license
from meet_lightning.inference.publish import PublishError, push_export
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint

SCHEMA = ControlSchema.from_dict({"harmless": ["good", "bad"]})


def export(folder, data: dict, control=None, base: str = "tiny-debug"):
    lm, tokenizer = load_model("tiny-debug"), load_tokenizer("tiny-debug")
    control = control or PromptTuningControl(num_tokens=2, init="random")
    control.setup(lm, tokenizer, SCHEMA)
    export_model(folder, lm, tokenizer, control, SCHEMA, base, model_fingerprint(lm), recipe={"data": data})
    return folder


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ({"a": "mit"}, ("mit", None)),
        ({"a": "apache-2.0", "b": "apache-2.0"}, ("apache-2.0", None)),
        ({"a": "apache-2.0", "b": "cc-by-nc-4.0"}, ("cc-by-nc-4.0", None)),
        ({"a": "apache-2.0", "b": "mit"}, ("other", "mixed")),
        ({"a": "mit", "b": None}, ("other", "unknown")),
    ],
)
def test_the_license_is_derived_from_every_part(parts, expected):
    assert combined_license(parts) == expected


def test_the_card_front_matter_parses_with_huggingface_hub(tmp_path):
    folder = export(tmp_path / "export", {"path": "Anthropic/hh-rlhf"}, base="smollm2-135m-instruct")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["Anthropic/hh-rlhf"]
    assert (card.data.license, card.data.license_name) == ("other", "mixed")  # apache-2.0 model, MIT data
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert "meet_lightning" in card.data.tags and "controls=" in card.text


def test_a_local_data_file_makes_the_license_unknown_and_the_card_says_so(tmp_path, shared_data):
    folder = export(tmp_path / "export", {"path": str(shared_data / "hh_rlhf_harmless.train.jsonl.gz")})
    card = ModelCard.load(folder / "README.md")
    assert (card.data.license, card.data.license_name, card.data.datasets) == ("other", "unknown", None)
    assert "before publishing" in card.text


def test_a_lora_card_shows_peft_use(tmp_path):
    folder = export(tmp_path / "export", {"path": "Anthropic/hh-rlhf"}, control=LoRAControl(rank=2))
    card = ModelCard.load(folder / "README.md")
    assert "peft" in card.data.tags
    assert 'PeftModel.from_pretrained(lm, "path/to/export/adapters/harmless/good"' in card.text


class FakeHub:
    """Records calls; fails ``upload_folder`` when asked to."""

    def __init__(self, exists: bool = False, fail: bool = False) -> None:
        self.exists, self.fail, self.calls = exists, fail, []

    def repo_exists(self, repo_id):
        return self.exists

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        if self.fail:
            response = SimpleNamespace(headers={}, status_code=403, request=None)
            raise HfHubHTTPError("403 Forbidden: you do not have write access", response=response)
        return type("Commit", (), {"commit_url": f"https://hub.example/{kwargs['repo_id']}/commit/1"})()

    def delete_repo(self, repo_id):
        self.calls.append(("delete_repo", repo_id, {}))


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(publish, "is_offline_mode", lambda: False)


def test_push_uploads_the_whole_export_in_one_commit(tmp_path, online):
    folder = export(tmp_path / "export", {"path": "Anthropic/hh-rlhf"})
    hub = FakeHub()
    url = push_export(folder, "me/model", private=True, revision="v1", api=hub)
    assert url == "https://hub.example/me/model/commit/1"
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][2]["private"] is True and hub.calls[2][2]["folder_path"] == str(folder)
    assert hub.calls[2][2]["revision"] == "v1"


def test_a_failed_upload_removes_the_repository_it_created_and_is_one_line(tmp_path, online):
    folder = export(tmp_path / "export", {"path": "Anthropic/hh-rlhf"})
    hub = FakeHub(fail=True)
    with pytest.raises(PublishError, match="me/model failed: 403 Forbidden.*write access"):
        push_export(folder, "me/model", api=hub)
    assert hub.calls[-1][0] == "delete_repo"
    existing = FakeHub(exists=True, fail=True)
    with pytest.raises(PublishError):
        push_export(folder, "me/model", api=existing)
    assert "delete_repo" not in [c[0] for c in existing.calls]  # someone else's repository stays


def test_push_offline_or_without_a_token_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    folder = export(tmp_path / "export", {"path": "Anthropic/hh-rlhf"})
    assert main(["push", "--model", str(folder), "--repo_id", "me/model"]) == 2  # the suite runs offline
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.setattr(publish, "is_offline_mode", lambda: False)
    monkeypatch.setattr(publish, "get_token", lambda: None)
    assert main(["push", "--model", str(folder), "--repo_id", "me/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf auth login" in err


def test_push_refuses_a_folder_that_is_not_an_export(tmp_path, online):
    with pytest.raises(Exception, match="meet_schema.json"):
        push_export(tmp_path, "me/model", api=FakeHub())
    folder = export(tmp_path / "export", {"path": "Anthropic/hh-rlhf"})
    (folder / "README.md").write_text("# no front matter\n")
    with pytest.raises(ConfigError, match="front matter lacks license"):
        push_export(folder, "me/model", api=FakeHub())


# ------------------------------------------------------------------------------------------ no local paths
def all_text(folder) -> dict[str, str]:
    """Every text file of an export (the vocabulary too: it must hold no path either)."""
    return {
        str(p.relative_to(folder)): p.read_text(encoding="utf-8")
        for p in folder.rglob("*")
        if p.suffix in (".json", ".md", ".jinja")
    }


def test_an_export_of_a_run_with_a_local_model_and_absolute_data_holds_no_local_path(tmp_path, shared_data, online):
    """Old code: the schema and card named ``/…/models/my-base``, the data file's full path and the output folder."""
    base = tmp_path / "models" / "my-base"
    load_model("tiny-debug").save_pretrained(base)
    load_tokenizer("tiny-debug").save_pretrained(base)
    hh = (shared_data / "hh_rlhf_harmless.train.jsonl.gz").resolve()
    out = tmp_path / "runs" / "meet"
    configs = Path(__file__).resolve().parents[1] / "configs"
    args = ["fit", "--config", str(configs / "meet_hh_prompt.yaml"), "--config", str(configs / "debug.yaml")]
    args += ["--model_name_or_path", str(base)]
    args += ["--data.path", str(hh), "--output_dir", str(out), "--stage2.model", "null"]
    assert main(args) == 0
    export = out / "export"
    texts = all_text(export)
    for name, text in texts.items():
        for local in (str(tmp_path), str(hh.parent), str(Path.home())):
            assert local not in text, (name, local)
    schema = json.loads(texts["meet_schema.json"])
    assert schema["base_model"] == "my-base" and schema["data"]["path"] == hh.name
    assert "# MEET-aligned my-base" in texts["README.md"] and f"- Data: `{hh.name}`" in texts["README.md"]
    hub = FakeHub()
    push_export(export, "me/model", api=hub)  # nothing to refuse
    assert hub.calls[-1][0] == "upload_folder"


@pytest.mark.parametrize(
    ("file", "edit"),
    [
        ("meet_schema.json", lambda t: t.replace('"base_model": "tiny-debug"', '"base_model": "/home/alice/models/base"')),
        ("README.md", lambda t: t.replace("- Data: `Anthropic/hh-rlhf`", "- Data: `/root/data/train.jsonl`")),
        ("config.json", lambda t: t.replace("{", '{"_name_or_path": "C:\\\\Users\\\\bob\\\\base",', 1)),
        ("generation_config.json", lambda t: t.replace("{", '{"note": ["~/secret"],', 1)),
    ],
)
def test_push_refuses_an_export_that_holds_a_local_path_before_any_network_call(
    tmp_path, online, monkeypatch, capsys, file, edit
):
    folder = export(tmp_path / "export", {"path": "Anthropic/hh-rlhf"})
    push_export(folder, "me/model", api=FakeHub())  # the export as written passes
    original = (folder / file).read_text()
    (folder / file).write_text(edit(original))
    assert (folder / file).read_text() != original
    hub = FakeHub()
    with pytest.raises(ConfigError, match=f"{file}: holds the local path .* nothing was sent"):
        push_export(folder, "me/model", api=hub)
    assert hub.calls == []
    monkeypatch.setattr(publish, "get_token", lambda: "token")
    monkeypatch.setattr(publish, "HfApi", lambda: pytest.fail("the Hub client must not be built"))
    assert main(["push", "--model", str(folder), "--repo_id", "me/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "holds the local path" in err
