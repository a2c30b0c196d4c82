"""Exports whose control tokens no engine generates, with ``suppress_tokens`` off (issue 33, item 0).

Tied embeddings made a control token's learned input vector its output row too, and a vector that wins the
logits is emitted over and over by any engine that ignores ``generation_config.suppress_tokens`` (llama.cpp;
transformers with ``suppress_tokens=None``). The export unties the head and gives the control rows output rows
that lose; these tests generate long answers greedily and by sampling with suppression off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from meet_lightning.controls.tokens import PromptTuningControl, SpecialTokenControl
from meet_lightning.data.rows import ControlSchema
from meet_lightning.inference.export import AlignedModel, export_model, read_schema
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint

SCHEMA = ControlSchema.from_dict({"length": ["concise", "verbose"], "harmless": ["good", "bad"]})
PROMPTS = ["How do I boil an egg?", "Tell me about the history of Rome."]
CASES = [[], ["concise"], ["verbose", "bad"]]
NEW_TOKENS = 200


def tiny_lm(tied: bool) -> torch.nn.Module:
    """The tiny llama with weights drawn so that, like a real LM's, its next-token distribution is peaked."""
    torch.manual_seed(0)
    lm = load_model("tiny-debug")
    if not tied:
        config = copy.deepcopy(lm.config)
        config.tie_word_embeddings = False
        lm = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in lm.named_parameters():
            if "norm" in name:
                weight.normal_(1.0, 0.3)
            else:  # embedding rows of norm ≈ the hidden size's root: logits spread like a real LM's
                weight.normal_(0.0, 1.0 if "embed" in name or "lm_head" in name else 0.15)
    return lm


def export(folder, control, tied: bool = True, scale: float = 6.0) -> list[int]:
    """Exports the tiny LM with control vectors scaled up (as training grows them); returns the control ids."""
    lm, tokenizer = tiny_lm(tied), load_tokenizer("tiny-debug")
    control.setup(lm, tokenizer, SCHEMA)
    with torch.no_grad():
        control.bank.normal_(0.0, scale)
    export_model(folder, lm, tokenizer, control, SCHEMA, "tiny-debug", model_fingerprint(lm))
    return read_schema(folder)["vocabulary"]["token_ids"]


def generate(lm, tokenizer, prompt: str, controls: list[str], **options) -> tuple[list[int], torch.Tensor]:
    """``NEW_TOKENS`` new ids (never stopping early) and their logits (T, V)."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        controls=controls,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = lm.generate(
        **ids,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        **options,
    )
    return out.sequences[0, ids["input_ids"].shape[1] :].tolist(), torch.cat(out.logits).float()


@pytest.mark.parametrize(
    "control, tied",
    [(PromptTuningControl(num_tokens=3, init="random"), True), (SpecialTokenControl(), True), (PromptTuningControl(2), False)],
    ids=["prompt-tied", "special-tied", "prompt-untied"],
)
def test_no_control_token_is_generated_with_suppress_tokens_off(tmp_path, control, tied):
    ids = export(tmp_path / "export", control, tied)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not lm.config.tie_word_embeddings and lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight
    assert set(ids) <= set(lm.generation_config.suppress_tokens)  # kept as well: it costs nothing
    real = torch.ones(lm.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    real[ids] = False
    old_rows = lm.get_input_embeddings().weight[ids].detach()  # a tied head's control rows: the learned vectors
    margins, old_margins, answers = [], [], set()
    for prompt in PROMPTS:
        for controls in CASES:
            free, logits = generate(lm, tokenizer, prompt, controls, do_sample=False, suppress_tokens=None)
            suppressed, _ = generate(lm, tokenizer, prompt, controls, do_sample=False)
            assert free == suppressed, (prompt, controls)  # same greedy answer as today's transformers path
            assert not set(free) & set(ids)
            margins.append((logits[:, ~real].max(1).values - logits[:, real].max(1).values).max())
            with torch.no_grad():  # what the tied head of the old export scored for the control tokens
                hidden = lm(torch.tensor([free]), output_hidden_states=True).hidden_states[-1][0]
            old_margins.append((hidden @ old_rows.T).max(1).values.sub(logits[:, real].max(1).values).max())
            answers.add(tuple(free))
            for seed in range(2):
                torch.manual_seed(seed)
                sampled, _ = generate(
                    lm, tokenizer, prompt, controls, do_sample=True, temperature=1.0, top_k=0, suppress_tokens=None
                )
                assert not set(sampled) & set(ids), (prompt, controls, seed)
    assert max(margins) < -5.0  # control logits sit far below the top real logit at every greedy step
    if tied:
        assert max(old_margins) > 0  # the learned vectors as output rows would have won: the test could fail
    assert len(answers) > 1  # the controls steer


def test_the_untied_export_is_tied_again_when_loaded_back(tmp_path):
    lm, tokenizer = tiny_lm(tied=True), load_tokenizer("tiny-debug")
    control = PromptTuningControl(num_tokens=2, init="random")
    control.setup(lm, tokenizer, SCHEMA)
    probe = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        trained = lm(input_ids=probe).logits
    export_model(tmp_path / "export", lm, tokenizer, control, SCHEMA, "tiny-debug", model_fingerprint(lm))
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" in weights.keys()  # its own tensor (no shared-tensor error on save)
    assert read_schema(tmp_path / "export")["vocabulary"]["untied_head"]
    loaded = AlignedModel.from_pretrained(tmp_path / "export", dtype="float32")
    assert loaded.lm.get_output_embeddings().weight is loaded.lm.get_input_embeddings().weight
    assert loaded.lm.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(loaded.lm(input_ids=probe).logits, trained)
