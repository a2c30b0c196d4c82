"""Baselines: SFT on chosen responses, Chain-of-Hindsight phrases, DPO (live and precomputed reference), hybrid."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import build_cpu_trainer, build_tiny_hh_data

from meet_lightning.controls.tokens import PromptTuningControl, TextControl, plain_logps
from meet_lightning.data.datamodule import PreferenceDataModule
from meet_lightning.errors import ConfigError
from meet_lightning.losses import nll, sequence_logps
from meet_lightning.models import build_tiny_model, load_tokenizer
from meet_lightning.modules import DPOModule, HybridDPOModule, SFTModule
from meet_lightning.modules.baselines import pair_keys


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second OpenMP thread spins and makes steps ~50× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_data(shared_data, **options) -> PreferenceDataModule:
    # 8 pairs fit in 128 tiny (byte) tokens
    return build_tiny_hh_data(shared_data, **{"max_length": 128, "max_examples": 32, "max_val_examples": 12, **options})


@pytest.fixture(scope="module")
def paired(shared_data) -> PreferenceDataModule:
    return make_data(shared_data, pair_batches=True)


def trainer(tmp_path, steps: int = -1, epochs: int | None = None, callbacks=()) -> L.Trainer:
    return build_cpu_trainer(tmp_path, steps, max_epochs=epochs, callbacks=list(callbacks))


class FirstLoss(L.Callback):
    """Records the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_dpo_starts_at_log2_falls_and_never_touches_or_saves_the_reference(paired, tmp_path):
    module = DPOModule("tiny-debug", None, paired.control_schema, lr=2e-3, beta=0.5)
    module.configure_model()
    reference = module.reference_lm()
    reference_before = {k: v.clone() for k, v in reference.state_dict().items()}
    batch = next(iter(paired.train_dataloader()))
    assert module.compute_loss(batch)["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    fit = trainer(tmp_path, steps=6)
    fit.fit(module, paired)
    assert module.compute_loss(batch)["loss"].item() < math.log(2) - 1e-3
    for key, value in reference.state_dict().items():
        assert torch.equal(value, reference_before[key]), key
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    reference_ids = {id(p) for p in reference.parameters()}
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.lm.parameters()} and not optimized & reference_ids
    path = tmp_path / "dpo.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    # every name of a trained tensor, tied ones too (FSDP loads strictly), and nothing of the reference
    assert set(state["state_dict"]) == {f"lm.{k}" for k, _ in module.lm.named_parameters(remove_duplicate=False)}
    assert "dpo_reference_logps" not in state  # live reference: nothing cached


def test_precomputed_reference_equals_the_live_one_and_hits_the_cache_every_epoch(paired, tmp_path):
    live = DPOModule("tiny-debug", None, paired.control_schema, beta=0.5)
    live.configure_model()
    module = DPOModule("tiny-debug", None, paired.control_schema, lr=2e-3, beta=0.5, precompute_reference=True)
    losses = FirstLoss()
    fit = trainer(tmp_path, epochs=2, callbacks=[losses])  # a few pairs, 4 per batch
    fit.fit(module, paired)
    assert module._reference is None  # scored by the policy itself before the first step, no second model
    assert losses.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # step 0: same loss as the live reference
    pairs = len(paired.train_items)
    assert pairs >= 4 and module.reference_cache_misses == 0
    assert module.reference_cache_hits == 2 * pairs  # every pair of both epochs from the cache
    for batch in paired.train_dataloader():
        chosen, rejected = live.reference_logps(batch)
        cached = torch.tensor([module.reference_cache[k] for k in pair_keys(batch)])
        torch.testing.assert_close(cached, torch.stack([chosen, rejected], 1), rtol=0, atol=1e-5)
    path = tmp_path / "dpo.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    assert len(state["dpo_reference_logps"]) == pairs + len(paired.val_items)  # train and validation pairs, as plain floats
    reloaded = DPOModule.load_from_checkpoint(path, weights_only=True)
    assert reloaded.reference_cache.keys() == module.reference_cache.keys()


def test_dpo_and_hybrid_reload_from_checkpoint_with_weights_only(paired, tmp_path):
    modules = {
        "dpo": DPOModule("tiny-debug", None, paired.control_schema, lr=1e-3),
        "hybrid": HybridDPOModule("tiny-debug", PromptTuningControl(num_tokens=2), paired.control_schema, dpo_weight=0.5),
    }
    for name, module in modules.items():
        fit = trainer(tmp_path, steps=1)
        fit.fit(module, paired)
        path = tmp_path / f"{name}.ckpt"
        fit.save_checkpoint(path)
        loaded = type(module).load_from_checkpoint(path, weights_only=True)
        for key, value in module.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (name, key)
        assert loaded.hparams == module.hparams


def test_hybrid_loss_is_nll_plus_weighted_dpo_on_the_control_classifier_margin(paired):
    schema = paired.control_schema
    module = HybridDPOModule("tiny-debug", PromptTuningControl(num_tokens=2), schema, dpo_weight=0.7, beta=0.3)
    module.configure_model()
    with torch.no_grad():
        module.control.bank.normal_()  # distinct good/bad controls, so the margin is not zero
    batch = next(iter(paired.train_dataloader()))
    out = module.compute_loss(batch)
    own = sequence_logps(*module.response_logps(batch))
    _, margin = module.control_accuracy(batch, own)  # [s(chosen) − s(rejected)] per pair, as validation computes it
    expected_dpo = -F.logsigmoid(0.3 * margin).mean()
    expected_nll = nll(*module.response_logps(batch))
    torch.testing.assert_close(out["dpo"], expected_dpo)
    torch.testing.assert_close(out["loss"], expected_nll + 0.7 * expected_dpo)
    with pytest.raises(ConfigError, match="pair_batches"):
        module.compute_loss({k: v for k, v in batch.items() if k != "num_pairs"})


def test_sft_trains_only_on_chosen_responses(shared_data, paired, tmp_path):
    data = make_data(shared_data, chosen_only=True)
    everything = make_data(shared_data, pair_batches=True, max_length=4096)  # every pair of the same 32

    def response(row) -> tuple[int, ...]:
        return tuple(t for t in row.labels if t != -100)

    chosen = {response(c) for c, _ in everything.train_items}
    rejected = {response(r) for _, r in everything.train_items}
    assert data.train_items and all(response(row) in chosen - rejected for row in data.train_items)
    assert len(data.train_items) >= len(paired.train_items)  # a pair whose rejected side is too long still counts
    good = data.control_schema["harmless"].index("good")
    for batch in data.train_dataloader():
        assert "num_pairs" not in batch and bool((batch["control_ids"] == good).all())
    module = SFTModule("tiny-debug", None, data.control_schema, lr=1e-3)
    module.configure_model()
    pair_batch = next(iter(paired.train_dataloader()))
    pairs = int(pair_batch["num_pairs"])
    token_logps, mask = plain_logps(module.lm, pair_batch)
    torch.testing.assert_close(module.compute_loss(pair_batch)["loss"], nll(token_logps[:pairs], mask[:pairs]))
    with pytest.raises(ConfigError, match="chosen_only"):
        trainer(tmp_path, steps=1).fit(SFTModule("tiny-debug", None, data.control_schema), make_data(shared_data))


def test_plain_baselines_refuse_control_tokens(paired):
    for cls in (SFTModule, DPOModule):
        with pytest.raises(ConfigError, match="remove `control`"):
            cls("tiny-debug", PromptTuningControl(num_tokens=2), paired.control_schema)
    with pytest.raises(ConfigError, match="pair_batches and --data.chosen_only"):
        PreferenceDataModule(path="x.jsonl", pair_batches=True, chosen_only=True)


def test_chain_of_hindsight_phrases_are_plain_tokens_in_the_spliced_input(paired):
    tokenizer = load_tokenizer("tiny-debug")
    control = TextControl({"good": "A good response:", "bad": "A bad response:"})
    from meet_lightning.data.rows import ControlSchema

    schema = ControlSchema.from_dict(paired.control_schema)
    control.setup(build_tiny_model(tokenizer), tokenizer, schema)
    batch = next(iter(paired.train_dataloader()))
    ids, _, labels = control.insert(batch)
    pairs = int(batch["num_pairs"])
    assert (ids >= 0).all()  # real vocabulary ids, no learned slots
    for row in range(2 * pairs):
        text = tokenizer.decode(ids[row])
        phrase = "A good response:\n" if row < pairs else "A bad response:\n"
        assert f"<|im_start|>assistant\n{phrase}" in text  # infix: right after the assistant header
        start = int(batch["response_start"][row])
        assert (labels[row, start : start + len(control.tokens_for(0 if row < pairs else 1))] == -100).all()


def test_pairwise_baselines_on_row_batches_fail_with_one_line(shared_data, tmp_path, capsys):
    from pathlib import Path

    from meet_lightning.commands.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    args = ["fit", "--config", str(configs / "baselines/dpo.yaml"), "--config", str(configs / "debug.yaml")]
    args += ["--data.path", str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"), "--data.max_length", "128"]
    assert main([*args, "--output_dir", str(tmp_path / "run"), "--data.pair_batches", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: DPOModule trains on paired batches") and err.count("\n") == 1
