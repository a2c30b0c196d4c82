"""Names are data: one rule for preference and label names, checked where data is read; no path written from a
name leaves its folder; the chat template reads names as data; an export carries no local paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from meet_lightning.commands.cli import main
from meet_lightning.controls.tokens import LoRAControl, PromptTuningControl
from meet_lightning.data.rows import ControlSchema
from meet_lightning.errors import ConfigError, DataError
from meet_lightning.inference.export import export_model
from meet_lightning.inference.peft_export import write_peft_adapters
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint
from meet_lightning.names import (
    check_name,
    is_absolute_path,
    local_paths,
    local_paths_in_text,
    public_value,
    safe_path,
    without_local_paths,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO = ROOT / "meet_lightning" / "demo_data" / "length_train.jsonl"
MESSAGES = [{"role": "user", "content": "How do I boil an egg?"}]
HOSTILE = ["it's short", "short 🙂", "{{ x }}", 'a"b\\c', "%}{% raw %}", "{# c #}", "x' ~ raise_exception('boom') ~ '"]
"""Names the rule refuses, but that the template must still carry as data (a schema built in Python skips the rule)."""


def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("name", ["concise", "good", "harmless 2", "v1.2", "low-mid_high", "très court", "短い", "कम", "bin10"])
def test_the_rule_allows_letters_of_any_script_digits_space_and_dash_underscore_dot(name):
    assert check_name("label", name, "data.jsonl:3") == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../../../../escaped", "starts with a dot"),
        ("a/b", "contains '/'"),
        ("a\\b", "contains '\\\\'"),
        (".hidden", "starts with a dot"),
        ("", "is empty"),
        (" good", "starts or ends with a space"),
        ("x" * 65, "is 65 characters long"),
        ("it's short", 'contains "\'"'),
        ("short 🙂", "contains '🙂'"),
        ("{{x}}", "contains '{'"),
        ("tab\there", "contains '\\t'"),
        ("a:b", "contains ':'"),
        ("a+b", "contains '+'"),
        (3, "is a int, not text"),
    ],
)
def test_the_rule_refuses_paths_code_and_control_characters_in_one_line(name, problem):
    with pytest.raises(DataError) as error:
        check_name("label", name, "data.jsonl:3")
    message = str(error.value)
    assert message.startswith(f"data.jsonl:3: label name {name!r} {problem} — rename the label")
    assert "allowed: letters, digits, space, '-', '_', '.' (not first), 1-64 characters" in message and "\n" not in message


def multi_response_file(path: Path, column: str) -> Path:
    """The demo's length data with its ``verbose`` column renamed to ``column`` (a label is a column name here)."""
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:24]]
    path.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "concise": r["concise"], column: r["verbose"]}) + "\n" for r in rows)
    )
    return path


@pytest.mark.parametrize("recipe", ["meet_hh_lora.yaml", "meet_hh_prompt.yaml"])
def test_a_label_that_is_a_path_is_refused_where_the_data_is_read(tmp_path, capsys, recipe):
    """Old code: exit 0, LoRA adapters written to ``export/adapters/length/../../../../escaped`` (outside the run)."""
    (tmp_path / "data").mkdir()
    data = multi_response_file(tmp_path / "data" / "train.jsonl", "../../../../escaped")
    out = tmp_path / "a" / "b" / "c" / "run"
    args = ["fit", "--config", str(CONFIGS / recipe), "--config", str(CONFIGS / "debug.yaml"), "--data.path", str(data)]
    args += ["--data.format", "multi_response", "--data.data_dir", "null", "--data.preference", "length"]
    assert run(*args, "--output_dir", str(out)) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{data}:1: label name '../../../../escaped' starts with a dot — rename the label" in line
    assert not any(p.name == "escaped" for p in tmp_path.rglob("*"))
    assert not (out / "export").exists()


def test_a_preference_name_from_the_recipe_is_checked_too(tmp_path, capsys, shared_data):
    hh = shared_data / "hh_rlhf_harmless.train.jsonl.gz"
    args = ["fit", "--config", str(CONFIGS / "meet_hh_prompt.yaml"), "--config", str(CONFIGS / "debug.yaml")]
    args += ["--data.path", str(hh), "--data.preference", "it's harmless", "--output_dir", str(tmp_path / "run")]
    assert run(*args) == 2
    line = error_line(capsys.readouterr().err)
    assert f'{hh}:1: preference name "it\'s harmless" contains "\'" — rename the preference' in line


# ------------------------------------------------------------------------------------------ written paths
def test_no_adapter_folder_is_written_outside_the_export_even_for_a_schema_built_in_python(tmp_path):
    """Defence in depth: a schema that skipped the rule (built in Python, an old checkpoint) still cannot escape."""
    lm, tokenizer = load_model("tiny-debug"), load_tokenizer("tiny-debug")
    for labels in (["good", "../../../../escaped"], ["good", "a/../../b"], ["good", ".."]):
        schema = ControlSchema.from_dict({"length": labels})
        control = LoRAControl(rank=2)
        control.setup(lm, tokenizer, schema)
        folder = tmp_path / "x" / "y" / "export"
        with pytest.raises(ConfigError, match="one folder inside it"):
            write_peft_adapters(folder, control.lora_weights(), schema)
        assert not (tmp_path / "x").exists()  # nothing written, not even the first (good) adapter


def test_safe_path_refuses_a_folder_that_resolves_outside(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "adapters").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match="resolves outside"):
        safe_path(tmp_path / "export", "adapters", "length", "concise")
    assert safe_path(tmp_path / "export", "combined", "a-b+c-d") == tmp_path / "export" / "combined" / "a-b+c-d"


# ------------------------------------------------------------------------------------------ the chat template
def test_the_exported_template_reads_hostile_names_as_data(tmp_path):
    """Old code: ``it's short`` broke the template (TemplateSyntaxError even without controls), the emoji label was
    refused by its own template ("unknown control"), and a name could add template code."""
    schema = ControlSchema.from_dict({"len'gth": HOSTILE, "p{%": ["good"]})
    torch.manual_seed(0)
    lm, tokenizer = load_model("tiny-debug"), load_tokenizer("tiny-debug")
    plain_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    control = PromptTuningControl(num_tokens=2, init="random")
    control.setup(lm, tokenizer, schema)
    export_model(tmp_path / "export", lm, tokenizer, control, schema, "tiny-debug", model_fingerprint(lm))
    exported = AutoTokenizer.from_pretrained(tmp_path / "export")  # plain transformers renders it (sandboxed Jinja)

    def render(controls: list[str]) -> str:
        return exported.apply_chat_template(MESSAGES, controls=controls, add_generation_prompt=True, tokenize=False)

    assert exported.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == plain_prompt
    for name in HOSTILE:
        tokens = f"<|len'gth/{name}:0|><|len'gth/{name}:1|>"
        assert render([name]) == tokens + plain_prompt, name
        assert render([f"len'gth/{name}"]) == tokens + plain_prompt, name
    # several preferences: schema order, whatever the order asked
    assert (
        render(["p{%/good", "short 🙂"])
        == "<|len'gth/short 🙂:0|><|len'gth/short 🙂:1|><|p{%/good:0|><|p{%/good:1|>" + plain_prompt
    )
    with pytest.raises(Exception, match="unknown control nope — known: .*it's short, .*short 🙂"):
        render(["nope"])
    with pytest.raises(Exception, match="unknown control short 🙂🙂"):
        render(["short 🙂🙂"])


# ------------------------------------------------------------------------------------------ local paths
@pytest.mark.parametrize(
    ("value", "public"),
    [
        ("/home/alice/models/SmolLM2", "SmolLM2"),
        ("/tmp/run/data.jsonl", "data.jsonl"),
        ("~/data/train.jsonl", "train.jsonl"),
        ("C:\\Users\\bob\\train.jsonl", "train.jsonl"),
        ("../shared/data/hh.jsonl.gz", "hh.jsonl.gz"),
        ("Anthropic/hh-rlhf", "Anthropic/hh-rlhf"),
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("val/control_accuracy", "val/control_accuracy"),
        ("https://huggingface.co/x", "https://huggingface.co/x"),
        (str(DEMO), "meet_lightning/demo_data/length_train.jsonl"),
    ],
)
def test_a_local_path_becomes_its_base_name_and_hub_ids_stay(value, public):
    assert public_value(value) == public
    assert not list(local_paths(without_local_paths({"a": [value], value: 1})))


def test_absolute_paths_are_found_in_json_and_in_text():
    assert [is_absolute_path(s) for s in ("/home/a", "C:\\x", "~/x", "//cdn", "/", "</s>", "{% x %}", "a/b")] == [
        True, True, True, False, False, False, False, False,
    ]  # fmt: skip
    assert list(local_paths({"a": {"b": ["x", "/root/secret"]}, "/tmp/key": 1})) == ["/root/secret", "/tmp/key"]
    text = "data: `/home/alice/train.jsonl`\n  path: /tmp/run/x\nsee https://hub.example/a/b and 1/2, and/or"
    assert local_paths_in_text(text) == ["/home/alice/train.jsonl", "/tmp/run/x"]
