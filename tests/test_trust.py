"""Numbers you can trust: each test here failed before the defect it names was fixed (issue 13).

1. every validation pass scores every pair (the sanity check used to shift the next one);
2. ``select: best`` ranks a checkpoint by its own validation (it used to take the previous one's);
3. what ``select`` picks is what is validated, reported, exported and handed to stage 2;
4. a precomputed DPO reference never loads a second model (the sanity check used to load one);
5. log-probs use the model's own logit processing (softcapping, logit scales), or refuse the model;
6. the control classifier's head runs in fp32 under bf16-mixed;
7. ``chosen_nll`` means one thing: the mean over responses of each response's mean token NLL.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import build_cpu_trainer, build_tiny_hh_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from meet_lightning.commands.cli import main, parse_recipe
from meet_lightning.controls.tokens import PromptTuningControl, controlled_response_logps
from meet_lightning.data.datamodule import PreferenceDataModule
from meet_lightning.errors import ConfigError
from meet_lightning.heads import check_lm_head
from meet_lightning.losses import sequence_logps
from meet_lightning.modules import ControlTokenModule, DPOModule, SFTModule
from meet_lightning.training import pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def recipe_args(command: str, recipe: str, out: Path, hh: Path, *extra: str) -> list[str]:
    """A debug run of ``configs/<recipe>`` on the shared HH file."""
    return [command, "--config", str(CONFIGS / recipe), "--config", str(CONFIGS / "debug.yaml"),
            "--data.path", str(hh), "--output_dir", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def hh(shared_data) -> Path:
    return shared_data / "hh_rlhf_harmless.train.jsonl.gz"


# ------------------------------------------------------------------------------------------- 1. validation
@pytest.mark.parametrize("recipe", ["meet_hh_prompt.yaml", "meet_hh_lora.yaml"])
def test_in_fit_validation_after_the_sanity_check_equals_validate_on_that_checkpoint(recipe, tmp_path, hh):
    # 8 validation examples in batches of 1: the sanity check's 2 batches used to be skipped by the next pass
    extra = ["--stage2.model", "null", "--data.eval_batch_size", "1", "--stage1.trainer.num_sanity_val_steps", "2",
             "--stage1.trainer.val_check_interval", "3"]  # fmt: skip
    args = recipe_args("fit", recipe, tmp_path / "run", hh, *extra)
    assert main(args) == 0
    with (tmp_path / "run" / "stage1" / "logs" / "version_0" / "metrics.csv").open() as file:
        in_fit = next(row for row in csv.DictReader(file) if row["val/loss"])  # the first in-fit validation
    logged = {k: float(v) for k, v in in_fit.items() if k.startswith("val/") and v}
    assert int(in_fit["step"]) == 2  # the validation of step 3 (0-based step 2), last.ckpt's weights
    recipe, _ = parse_recipe("validate", ["--stage", "stage1", *args[1:]])
    validated = pipeline.evaluate_stage(recipe, "validate", "stage1")[0]
    assert set(logged) == {"val/loss", "val/control_accuracy", "val/control_margin"}
    for key, value in logged.items():
        assert validated[key] == pytest.approx(value, abs=1e-5), key


# ------------------------------------------------------------------------------- 2 + 3. select: best
SCRIPTED = '''
from meet_lightning import ControlTokenModule

SCORES = [0.2, 0.9, 0.5, 0.1]
"""The n-th distinct weights validated score SCORES[n]: rises, then falls."""
seen = {}  # bank checksum → its score (a weight set always scores the same)
banks = {}  # global step → the bank its in-fit validation saw


class ScriptedScoreModule(ControlTokenModule):
    def validation_step(self, batch, batch_idx):
        bank = self.control.bank.detach()
        score = seen.setdefault(float(bank.double().sum()), SCORES[min(len(seen), len(SCORES) - 1)])
        if self.trainer.state.fn == "fit":
            banks[self.global_step] = bank.clone()
        self.log("val/control_accuracy", score, batch_size=1)
'''


def test_select_best_is_ranked_by_its_own_validation_and_used_everywhere(tmp_path, hh, monkeypatch):
    (tmp_path / "scripted_score.py").write_text(SCRIPTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    scripted = importlib.import_module("scripted_score")
    out = tmp_path / "run"
    extra = ["--stage1.model", "scripted_score.ScriptedScoreModule", "--stage1.select", "best",
             "--stage1.trainer.max_steps", "4", "--stage1.trainer.val_check_interval", "1",
             "--stage1.trainer.limit_val_batches", "1", "--stage2.model", "null"]  # fmt: skip
    args = recipe_args("fit", "meet_hh_prompt.yaml", out, hh, *extra)
    assert main(args) == 0
    assert sorted(scripted.banks) == [1, 2, 3, 4] and len(scripted.seen) == 4
    best = scripted.banks[2]  # validated after step 2 with 0.9; step 3 (0.5) used to be kept as "best"
    # handed to stage 2: the stage-1 controls file
    assert torch.equal(load_file(out / "stage1" / "controls.safetensors")["bank"], best)
    # reported: done.json and the model card describe those weights
    done = json.loads((out / "stage1" / "done.json").read_text())
    assert done["val/control_accuracy"] == pytest.approx(0.9) and done["selected_step"] == 2 and done["global_step"] == 4
    card = (out / "export" / "README.md").read_text()
    card_metrics = json.loads(card.split("## Metrics")[1].split("```json")[1].split("```")[0])["stage1"]
    assert card_metrics["val/control_accuracy"] == pytest.approx(0.9) and card_metrics["selected_step"] == 2
    # exported (a stage-1-only recipe exports stage 1)
    assert torch.equal(load_file(out / "export" / "controls.safetensors")["bank"], best)
    # validated: `validate --stage stage1` reads the selected checkpoint, not last.ckpt
    recipe, _ = parse_recipe("validate", ["--stage", "stage1", *args[1:]])
    assert pipeline.evaluate_stage(recipe, "validate", "stage1")[0]["val/control_accuracy"] == pytest.approx(0.9)


def test_select_best_without_any_validation_is_a_one_line_error(tmp_path, hh, capsys):
    extra = ["--stage1.select", "best", "--stage1.trainer.max_steps", "1", "--stage2.model", "null"]
    assert main(recipe_args("fit", "meet_hh_prompt.yaml", tmp_path / "run", hh, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "--stage1.select best: no validation ran" in err and "\n" not in err


# --------------------------------------------------------------------------------- 4. DPO reference
@pytest.fixture(scope="module")
def paired(shared_data) -> PreferenceDataModule:
    return build_tiny_hh_data(shared_data, max_length=128, max_examples=32, max_val_examples=12, pair_batches=True)


class ReferenceWatch(L.Callback):
    """Records each step's loss and whether a reference LM exists while training."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.reference_seen = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.reference_seen |= pl_module._reference is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def dpo_fit(paired, tmp_path, precompute: bool) -> tuple[DPOModule, ReferenceWatch]:
    L.seed_everything(0)
    module = DPOModule("tiny-debug", None, paired.control_schema, lr=2e-3, beta=0.5, precompute_reference=precompute)
    watch = ReferenceWatch()
    trainer = build_cpu_trainer(tmp_path, 4, num_sanity_val_steps=2, val_check_interval=2, limit_val_batches=None,
                                callbacks=[watch])  # fmt: skip
    trainer.fit(module, paired)
    return module, watch


def test_precomputed_reference_never_loads_a_second_model_even_with_a_sanity_check(paired, tmp_path):
    cached, watch = dpo_fit(paired, tmp_path, precompute=True)
    assert not watch.reference_seen and cached._reference is None and cached.reference_cache_misses == 0
    live, live_watch = dpo_fit(paired, tmp_path, precompute=False)
    assert live_watch.reference_seen  # the live run does hold one: the watch can see it
    assert watch.losses == pytest.approx(live_watch.losses, abs=1e-5)


# ------------------------------------------------------------------------------------ 5. the LM head
def tiny_config(architecture: str):
    """A tiny config of an architecture whose forward post-processes its logits."""
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    shape = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    return {
        "gemma2": lambda: Gemma2Config(**shape, head_dim=8, final_logit_softcapping=0.05, attn_logit_softcapping=None),
        "cohere": lambda: CohereConfig(**shape, logit_scale=0.0625),
        "granite": lambda: GraniteConfig(**shape, logits_scaling=8.0),
    }[architecture]()


@pytest.mark.parametrize("architecture", ["gemma2", "cohere", "granite"])
def test_response_logps_are_those_of_the_models_own_logits(architecture):
    from meet_lightning.controls.tokens import ControlTokens

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config(architecture)).eval()
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # a 4-token prompt, then the response
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "control_ids": torch.full((2, 1), -1)}  # fmt: skip
    with torch.no_grad():
        own = lm(input_ids=ids).logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (2, 8)
        plain = lm.get_output_embeddings()(lm.get_decoder()(input_ids=ids).last_hidden_state)  # no logit processing
        token_logps, mask = controlled_response_logps(lm, ControlTokens(), batch)  # (2, 8)
    assert (lm(input_ids=ids).logits - plain).abs().max() > 0.1  # the processing matters on these configs
    assert mask[:, 3:].all() and not mask[:, :3].any()
    torch.testing.assert_close(token_logps[:, 3:], own[:, 3:], rtol=1e-5, atol=1e-5)
    check_lm_head(lm, architecture)  # accepted


def test_a_model_with_an_unknown_logit_processing_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    class TemperedLlama(LlamaForCausalLM):
        """A llama whose forward divides its logits by a temperature no config field announces."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 0.7
            return out

    shape = {k: v for k, v in vars(tiny_config("granite")).items() if k in ("vocab_size", "hidden_size", "intermediate_size")}
    lm = TemperedLlama(LlamaConfig(**shape, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(
        ConfigError, match=r"model tempered: its forward post-processes logits .* use another --model_name_or_path"
    ):
        check_lm_head(lm, "tempered")


# ------------------------------------------------------------------------------- 6. scoring precision
def test_control_classifier_margin_under_bf16_mixed_is_within_1e2_of_fp32(paired):
    torch.manual_seed(0)
    control = PromptTuningControl(num_tokens=4, init="random")
    module = ControlTokenModule("tiny-debug", control, paired.control_schema)
    module.configure_model()
    module.eval()
    batch = next(iter(paired.val_dataloader()))
    with torch.no_grad():
        _, fp32 = module.control_accuracy(batch, sequence_logps(*module.response_logps(batch)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, bf16 = module.control_accuracy(batch, sequence_logps(*module.response_logps(batch)))
    gap = (bf16 - fp32).abs().max().item()
    print(f"bf16-mixed margin {bf16.tolist()} vs fp32 {fp32.tolist()}: |Δ| {gap:.4f}")
    assert gap < 1e-2, f"bf16-mixed margin {bf16.tolist()} vs fp32 {fp32.tolist()}: |Δ| {gap:.4f}"


# ----------------------------------------------------------------------------------------- 7. chosen_nll
def test_val_chosen_nll_is_the_mean_of_each_responses_mean_token_nll(paired):
    module = SFTModule("tiny-debug", None, paired.control_schema)
    module.configure_model()
    module.eval()
    logged = {}
    module.log = lambda name, value, **kwargs: logged.setdefault(name, float(value))
    batch = next(iter(paired.val_dataloader()))
    pairs = int(batch["num_pairs"])
    with torch.no_grad():
        module.validation_step(batch, 0)
        token_logps, mask = controlled_response_logps(module.lm, module.control, batch, torch.full_like(batch["control_ids"], -1))
    lengths = mask[:pairs].sum(-1)
    assert lengths.unique().numel() > 1  # responses of different lengths: the two definitions differ here
    per_response = -(token_logps[:pairs] * mask[:pairs]).sum(-1) / lengths
    token_weighted = -(token_logps[:pairs] * mask[:pairs]).sum() / lengths.sum()
    assert logged["val/chosen_nll"] == pytest.approx(per_response.mean().item(), abs=1e-5)
    assert not math.isclose(logged["val/chosen_nll"], token_weighted.item(), abs_tol=1e-4)
    from meet_lightning.losses import response_nll

    torch.testing.assert_close(response_nll(token_logps[:pairs], mask[:pairs]), per_response)
