"""Prompt-tuning exports steered by plain transformers: controls as added tokens and a chat-template variable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from meet_lightning.controls.tokens import PromptTuningControl, SpecialTokenControl
from meet_lightning.data.rows import ControlSchema
from meet_lightning.data.tokenization import PromptTokenizer
from meet_lightning.errors import ConfigError
from meet_lightning.inference.export import AlignedModel, export_model, read_schema
from meet_lightning.inference.generation import prompt_batch, resolve_controls
from meet_lightning.models import (
    DEFAULT_MODEL,
    TINY_CHAT_TEMPLATE,
    load_model,
    load_tokenizer,
    model_cache_dir,
    model_fingerprint,
)

SCHEMA = ControlSchema.from_dict({"length": ["concise", "verbose"], "harmless": ["good", "bad"]})
MESSAGES = [{"role": "user", "content": "How do I boil an egg?"}]
CASES = [["concise"], ["harmless/bad"], ["verbose", "good"], ["good", "length/verbose"], []]
"""One control, a full name, two preferences (in either order: written in schema order), and no control."""


def export(
    folder, placement: str, control=None, template: str | None = None, model: str = "tiny-debug", scale: float = 1.0
) -> AlignedModel:
    """A model with untrained control vectors (times ``scale``), exported (the vectors need no training to be checked)."""
    torch.manual_seed(0)
    lm, tokenizer = load_model(model), load_tokenizer(model)
    if model == "tiny-debug":
        with torch.no_grad():  # larger weights than the default init: greedy output that depends on the controls
            for name, weight in lm.named_parameters():
                weight.normal_(1.0 if "norm" in name else 0.0, 0.3 if "norm" in name else 0.15)
    if template is not None:
        tokenizer.chat_template = template
    control = control or PromptTuningControl(num_tokens=3, init="random", placement=placement)
    control.setup(lm, tokenizer, SCHEMA)
    with torch.no_grad():
        for vectors in control.parameters():
            vectors.mul_(scale)
    export_model(folder, lm, tokenizer, control, SCHEMA, model, model_fingerprint(lm))
    return AlignedModel.from_pretrained(folder, dtype="float32")


def library_ids(model: AlignedModel, controls: list[str]) -> list[int]:
    """The prompt the library builds for ``controls``, learned slots written as the export's added token ids."""
    batch = prompt_batch(PromptTokenizer(model.tokenizer, 1024), [MESSAGES], [resolve_controls(model.schema, controls)], 1024)
    ids = model.control.insert(batch)[0][0].tolist()
    added = model.tokenizer.convert_tokens_to_ids([f"<|{name}:{t}|>" for name in model.schema.names for t in range(3)])
    return [added[-i - 1] if i < 0 else i for i in ids]


@pytest.mark.parametrize("placement", ["prefix", "infix"])
@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "template-bos"])
def test_the_chat_template_writes_the_controls_where_training_inserted_them(tmp_path, placement, bos):
    template = "{{ bos_token }}" + TINY_CHAT_TEMPLATE if bos else None
    model = export(tmp_path / "export", placement, template=template)
    for controls in CASES:
        rendered = model.tokenizer.apply_chat_template(MESSAGES, controls=controls, add_generation_prompt=True, tokenize=True)
        rendered = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
        assert list(rendered) == library_ids(model, controls), controls
    plain = model.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert "<|" + "length/" not in plain  # no controls: the plain prompt
    with pytest.raises(Exception, match="unknown control nope"):
        model.tokenizer.apply_chat_template(MESSAGES, controls=["nope"], add_generation_prompt=True, tokenize=False)


PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import json, sys
    sys.modules["meet_lightning"] = None  # this process cannot use the library
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, cases, control_ids = sys.argv[1], json.loads(sys.argv[2]), set(json.loads(sys.argv[3]))
    tokenizer, lm = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    greedy, sampled = [], []
    for controls in cases:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "How do I boil an egg?"}], controls=controls, add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )
        # suppression off: the export alone keeps control tokens out (issue 33)
        out = lm.generate(**ids, max_new_tokens=12, do_sample=False, suppress_tokens=None)[0, ids["input_ids"].shape[1]:]
        greedy.append(tokenizer.decode(out, skip_special_tokens=True).strip())
        for seed in range(3):
            torch.manual_seed(seed)
            out = lm.generate(**ids, max_new_tokens=12, do_sample=True, temperature=2.0, top_k=0)
            sampled += out[0, ids["input_ids"].shape[1]:].tolist()
    print(json.dumps({"greedy": greedy, "control_tokens_sampled": len(control_ids & set(sampled))}))
    """
)


def plain_transformers(folder, cases: list[list[str]], control_token_ids: list[int]) -> dict:
    """Greedy answers (and sampled control tokens) of plain transformers, in a process without the library."""
    args = [str(folder), json.dumps(cases), json.dumps(control_token_ids)]
    run = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, *args], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("placement", ["prefix", "infix"])
def test_plain_transformers_without_the_library_generates_what_aligned_model_does(tmp_path, placement):
    model = export(tmp_path / "export", placement)
    plain = plain_transformers(tmp_path / "export", CASES, read_schema(tmp_path / "export")["vocabulary"]["token_ids"])
    ours = [model.generate([MESSAGES], control=controls or None, max_new_tokens=12)[0] for controls in CASES]
    assert plain["greedy"] == ours
    assert len(set(ours)) > 1  # the controls change the output: the comparison could fail
    assert plain["control_tokens_sampled"] == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "controls=['concise']" in card or "controls=['length/concise']" in card


def test_special_token_controls_export_as_one_token_each(tmp_path):
    model = export(tmp_path / "export", "prefix", control=SpecialTokenControl())
    info = read_schema(tmp_path / "export")
    assert info["vocabulary"]["tokens_per_control"] == 1 and len(info["vocabulary"]["token_ids"]) == SCHEMA.num_controls
    text = model.tokenizer.apply_chat_template(MESSAGES, controls=["concise"], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|length/concise:0|><|im_start|>")


def test_a_template_whose_bos_cannot_be_found_is_refused():
    from meet_lightning.controls.vocab import controlled_template

    with pytest.raises(ConfigError, match="BOS"):
        controlled_template("{{ messages[0]['content'] }}", SCHEMA, 1, "prefix", bos_first=True)


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["prefix", "infix"])
def test_smollm2_export_steered_by_plain_transformers_matches(tmp_path, placement):
    if not (model_cache_dir() / DEFAULT_MODEL / "config.json").is_file():
        pytest.skip(f"{DEFAULT_MODEL} is not downloaded: run `python -m meet_lightning download-model`")
    model = export(tmp_path / "export", placement, model=DEFAULT_MODEL)
    cases = [["concise"], ["verbose", "bad"], []]
    plain = plain_transformers(tmp_path / "export", cases, read_schema(tmp_path / "export")["vocabulary"]["token_ids"])
    assert plain["greedy"] == [model.generate([MESSAGES], control=c or None, max_new_tokens=12)[0] for c in cases]
    assert plain["control_tokens_sampled"] == 0


def test_the_loaded_export_scores_over_the_trained_vocabulary(tmp_path):
    """Kept, the added rows would be output classes (tied embeddings) and shift every log-softmax."""
    torch.manual_seed(0)
    lm, tokenizer = load_model("tiny-debug"), load_tokenizer("tiny-debug")
    control = PromptTuningControl(num_tokens=2, init="random")
    control.setup(lm, tokenizer, SCHEMA)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        trained = lm(input_ids=ids).logits  # (1, 5, V)
    export_model(tmp_path / "export", lm, tokenizer, control, SCHEMA, "tiny-debug", model_fingerprint(lm))
    assert lm.get_input_embeddings().weight.shape[0] > trained.shape[-1]  # the export did add rows
    loaded = AlignedModel.from_pretrained(tmp_path / "export", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(loaded.lm(input_ids=ids).logits, trained)
    assert not loaded.lm.generation_config.suppress_tokens


DIRECTIVES = {
    "controls: concise": ["concise"],
    "  controls:verbose , harmless/good ": ["verbose", "harmless/good"],
    "controls: none": [],
    "controls:": [],
}


@pytest.mark.parametrize("placement", ["prefix", "infix"])
def test_a_controls_directive_in_the_system_message_renders_as_the_controls_variable(tmp_path, placement):
    """Servers that pass no template variables steer through a first system message; it never reaches the prompt."""
    from meet_lightning.controls.vocab import split_directive

    model = export(tmp_path / "export", placement)
    render = model.tokenizer.apply_chat_template
    for text, names in DIRECTIVES.items():
        messages = [{"role": "system", "content": text}, *MESSAGES]
        assert split_directive(messages) == (MESSAGES, names)  # the Python rule (this library's server) …
        by_directive = render(messages, add_generation_prompt=True, tokenize=False)
        assert by_directive == render(MESSAGES, controls=names, add_generation_prompt=True, tokenize=False), text
        assert "controls:" not in by_directive  # … and the template's: the message is dropped
    # the variable wins over a directive; an ordinary system message is no directive and stays
    directed = [{"role": "system", "content": "controls: concise"}, *MESSAGES]
    wins = render(directed, controls=["verbose"], add_generation_prompt=True, tokenize=False)
    assert wins == render(MESSAGES, controls=["verbose"], add_generation_prompt=True, tokenize=False)
    ordinary = [{"role": "system", "content": "Be brief. controls: concise"}, *MESSAGES]
    assert split_directive(ordinary) == (ordinary, None)
    assert "Be brief. controls: concise" in render(ordinary, add_generation_prompt=True, tokenize=False)
    with pytest.raises(Exception, match="unknown control nope"):
        render([{"role": "system", "content": "controls: nope"}, *MESSAGES], add_generation_prompt=True, tokenize=False)
