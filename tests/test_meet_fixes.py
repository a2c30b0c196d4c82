"""Issue 30's MEET-specific fixes: each test fails on the code before the fix."""

from __future__ import annotations

import random

import pytest

from meet_lightning.data.datamodule import ResumableBatchSampler


def _length_task(n: int = 400) -> tuple[list[int], list[int]]:
    """Half long rows (label 1, 'verbose'), half short (label 0, 'concise'), interleaved at random."""
    rng = random.Random(0)
    labels = [rng.randint(0, 1) for _ in range(n)]
    lengths = [rng.randint(200, 320) if label else rng.randint(20, 60) for label in labels]
    return labels, lengths


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouping_keeps_each_batchs_label_mix_close_to_the_datas():
    labels, lengths = _length_task()
    share = sum(labels) / len(labels)
    grouped = list(ResumableBatchSampler(len(labels), 8, seed=1, lengths=lengths, labels=labels))
    shares = [sum(labels[i] for i in b) / len(b) for b in grouped if len(b) == 8]
    # Every full batch within ±2 rows of the data's own mix (old code: almost every batch single-label).
    assert all(abs(s - share) <= 0.25 for s in shares), shares
    # Still grouped: less padding than batches drawn without length grouping.
    plain = list(ResumableBatchSampler(len(labels), 8, seed=1))
    assert _padding(grouped, lengths) < 0.8 * _padding(plain, lengths)


def test_length_grouping_without_labels_is_unchanged_and_single_label_on_the_length_task():
    """What the fix is for: grouping by raw length separates the labels (the measurement behind the change)."""
    labels, lengths = _length_task()
    grouped = list(ResumableBatchSampler(len(labels), 8, seed=1, lengths=lengths))
    single = sum(len({labels[i] for i in b}) == 1 for b in grouped)
    assert single >= 0.9 * len(grouped)


# ------------------------------------------------------------------ control initialisation
def _bank(control, seed_everything: int | None = None):
    import torch

    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

    if seed_everything is not None:
        torch.manual_seed(seed_everything)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    control.setup(model, tokenizer, ControlSchema.from_dict({"length": ["concise", "verbose"]}))
    return control.bank.detach().clone(), model, tokenizer


def test_control_initialisation_follows_the_runs_seed_unless_one_is_given():
    import torch

    from meet_lightning import PromptTuningControl

    for init in ("vocab", "random"):
        a = _bank(PromptTuningControl(num_tokens=4, init=init), seed_everything=1)[0]
        b = _bank(PromptTuningControl(num_tokens=4, init=init), seed_everything=2)[0]
        again = _bank(PromptTuningControl(num_tokens=4, init=init), seed_everything=1)[0]
        assert not torch.equal(a, b), init  # old code: seed fixed at 0, every run seed gave this same init
        assert torch.equal(a, again), init
        fixed = [_bank(PromptTuningControl(num_tokens=4, init=init, seed=7), seed_everything=s)[0] for s in (1, 2)]
        assert torch.equal(*fixed), init


def test_lora_control_initialisation_follows_the_runs_seed():
    import torch

    from meet_lightning import LoRAControl
    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

    def first_a(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        control = LoRAControl(rank=2)
        control.setup(build_tiny_model(tokenizer), tokenizer, ControlSchema.from_dict({"length": ["concise", "verbose"]}))
        return next(iter(control.lora_a.values())).detach().clone()

    assert not torch.equal(first_a(1), first_a(2))
    assert torch.equal(first_a(1), first_a(1))


def test_vocab_init_draws_only_ordinary_tokens():
    import torch

    from meet_lightning import PromptTuningControl
    from meet_lightning.controls.tokens import ordinary_token_ids

    bank, model, tokenizer = _bank(PromptTuningControl(num_tokens=200, init="vocab"), seed_everything=0)
    vocab = model.get_input_embeddings().weight.detach()
    rows = bank.reshape(-1, bank.shape[-1])  # (C·T, H)
    drawn = {int((vocab - row).abs().sum(-1).argmin()) for row in rows}
    specials = set(tokenizer.all_special_ids)
    assert specials and not drawn & specials  # old code drew ids 0-4999, special tokens included
    assert set(ordinary_token_ids(tokenizer, len(tokenizer))) >= drawn
    assert torch.isfinite(bank).all()


def test_vocab_init_skips_byte_fallback_tokens():
    from meet_lightning.controls.tokens import ordinary_token_ids

    class SentencePieceLike:
        all_special_ids = [0, 1, 2]
        added_tokens_decoder = {5: "<extra>"}

        def convert_ids_to_tokens(self, ids):
            table = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xFF>", "<extra>", "▁the", "ing"]
            return [table[i] for i in ids]

    assert ordinary_token_ids(SentencePieceLike(), 8) == [6, 7]


def test_text_init_is_the_default_and_derives_phrases_from_the_label_names():
    import torch

    from meet_lightning import PromptTuningControl
    from meet_lightning.controls.tokens import default_phrase

    control = PromptTuningControl(num_tokens=6)
    assert control.init == "text"
    bank, model, tokenizer = _bank(control, seed_everything=0)
    vocab = model.get_input_embeddings().weight.detach()
    for row, label in zip(bank, ("concise", "verbose"), strict=True):
        ids = tokenizer(f"A {label} response:", add_special_tokens=False)["input_ids"]
        expected = (ids * 6)[:6]
        assert torch.equal(row, vocab[torch.tensor(expected)])
    # a phrase the recipe gives wins; a label two preferences share names its preference
    given = _bank(PromptTuningControl(num_tokens=6, init_text={"concise": "Briefly:"}), seed_everything=0)[0]
    assert not torch.equal(given[0], bank[0]) and torch.equal(given[1], bank[1])
    assert default_phrase("harmless", "good", shared=True) == "A good response (harmless):"
    assert default_phrase("quality", "very_good", shared=False) == "A very good response:"


# ------------------------------------------------------------------ stage 2: what the controls do, and logging it
@pytest.fixture(scope="module")
def hh_datamodule(shared_data):
    from conftest import build_tiny_hh_data

    return build_tiny_hh_data(shared_data)


def _fit(module, data, trainer_factory, steps: int = 3):
    trainer = trainer_factory(steps, log_every_n_steps=1)
    trainer.fit(module, data)
    return trainer.callback_metrics


@pytest.mark.parametrize("controls", ["train", "frozen"])
def test_stage2_controls_train_or_stay_frozen_and_both_updates_are_logged(controls, hh_datamodule, cpu_trainer):
    import torch

    from meet_lightning import PromptTuningControl
    from meet_lightning.modules import JointFinetuneModule

    module = JointFinetuneModule(
        "tiny-debug", PromptTuningControl(num_tokens=2), hh_datamodule.control_schema, lr=1e-3, controls=controls
    )
    module.configure_model()
    bank = module.control.bank.detach().clone()
    metrics = _fit(module, hh_datamodule, cpu_trainer)
    lm_ratio = float(metrics["train/update_ratio_lm"])
    assert 0 < lm_ratio < 1  # the LM moved, by a small fraction of its norm
    if controls == "frozen":
        assert torch.equal(module.control.bank, bank)
        assert "train/update_ratio_controls" not in metrics  # nothing of the controls trains
    else:
        assert not torch.equal(module.control.bank, bank)
        assert float(metrics["train/update_ratio_controls"]) > 0
    assert module.hparams.controls == controls


def test_stage1_logs_the_controls_update_and_no_lm_update(hh_datamodule, cpu_trainer):
    from meet_lightning import PromptTuningControl
    from meet_lightning.modules import ControlTokenModule

    module = ControlTokenModule("tiny-debug", PromptTuningControl(num_tokens=2), hh_datamodule.control_schema, lr=1e-2)
    metrics = _fit(module, hh_datamodule, cpu_trainer, steps=2)
    assert float(metrics["train/update_ratio_controls"]) > 0
    assert "train/update_ratio_lm" not in metrics


def test_stage2_controls_mode_is_checked():
    from meet_lightning.errors import ConfigError
    from meet_lightning.modules import JointFinetuneModule

    with pytest.raises(ConfigError, match="controls 'fixed' is not one of train, frozen"):
        JointFinetuneModule("tiny-debug", controls="fixed")


def test_update_probe_measures_the_relative_update_exactly_on_small_tensors_and_closely_on_large_ones():
    import torch

    from meet_lightning.update_probe import UpdateProbe

    small, large = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.randn(100_000))
    probe = UpdateProbe({"small": [small], "large": [large]}, per_tensor=4096)
    probe.snapshot()
    with torch.no_grad():
        small.mul_(1.1)  # relative update exactly 0.1
        large.add_(0.05 * torch.randn(100_000))  # ≈ 0.05
    ratios = probe.ratios()
    assert ratios["small"] == pytest.approx(0.1, rel=1e-5)
    assert ratios["large"] == pytest.approx(0.05, rel=0.1)
    assert probe.ratios() == {}  # one measure per snapshot


def test_the_hybrid_module_takes_the_stage2_controls_choice(hh_datamodule):
    """HybridDPOModule restates JointFinetuneModule's signature: without ``controls`` it failed in configure_model."""
    from meet_lightning import PromptTuningControl
    from meet_lightning.modules import HybridDPOModule

    module = HybridDPOModule("tiny-debug", PromptTuningControl(num_tokens=2), hh_datamodule.control_schema, controls="frozen")
    module.configure_model()
    assert module.hparams.controls == "frozen" and not any(p.requires_grad for p in module.control.parameters())


# ------------------------------------------------------------------ the NLL: per token or per response
def test_per_response_loss_counts_every_response_once_and_the_default_stays_the_token_mean(hh_datamodule):
    """``per_response_loss`` (new): the training NLL is the mean of each response's own mean token NLL; off, it
    is the token mean it always was; on a batch of responses of different lengths the two differ."""
    import torch

    from meet_lightning import PromptTuningControl
    from meet_lightning.losses import nll
    from meet_lightning.modules import ControlTokenModule

    batch = next(iter(hh_datamodule.train_dataloader()))
    losses = {}
    for per_response in (False, True):
        torch.manual_seed(0)
        module = ControlTokenModule(
            "tiny-debug", PromptTuningControl(num_tokens=2), hh_datamodule.control_schema, per_response_loss=per_response
        )
        module.configure_model()
        token_logps, mask = module.response_logps(batch)  # (B, T-1)
        lengths = mask.sum(-1)
        assert len(set(lengths.tolist())) > 1  # responses of different lengths
        per_row = -(token_logps * mask).sum(-1) / lengths.clamp(min=1)
        expected = per_row[lengths > 0].mean() if per_response else nll(token_logps, mask)
        losses[per_response] = module.compute_loss(batch)["loss"]
        torch.testing.assert_close(losses[per_response], expected)
    assert not torch.allclose(losses[False], losses[True])
