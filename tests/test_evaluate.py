"""Evaluation: the right metrics for each kind of model, control fidelity, plots, reward models, judges, samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_cpu_trainer, build_tiny_hh_data
from transformers import LlamaConfig, LlamaForSequenceClassification

from meet_lightning.commands.cli import main
from meet_lightning.evaluation.metrics import RewardModel, control_fidelity, load_for_evaluation, win_rate
from meet_lightning.models import build_tiny_model, build_tiny_tokenizer, load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAIR_METRICS = ("chosen_nll", "logp_accuracy")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second OpenMP thread spins and makes steps ~50× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)


@pytest.fixture(scope="module")
def hh(shared_data) -> Path:
    return shared_data / "hh_rlhf_harmless.train.jsonl.gz"


def fit_recipe(recipe: str, out: Path, hh: Path, *extra: str) -> Path:
    args = ["fit", "--config", str(CONFIGS / recipe), "--config", str(CONFIGS / "debug.yaml")]
    args += ["--data.path", str(hh), "--data.max_length", "128", "--output_dir", str(out), *extra]
    assert run(*args) == 0
    return out


@pytest.fixture(scope="module")
def meet_export(tmp_path_factory, hh) -> Path:
    return fit_recipe("ablations/stage1_only.yaml", tmp_path_factory.mktemp("meet") / "run", hh) / "export"


@pytest.fixture(scope="module")
def dpo_export(tmp_path_factory, hh) -> Path:
    return fit_recipe("baselines/dpo.yaml", tmp_path_factory.mktemp("dpo") / "run", hh) / "export"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """The untrained tiny base as a plain Hugging Face folder (no meet_lightning files)."""
    folder = tmp_path_factory.mktemp("base") / "tiny"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory) -> Path:
    """A tiny random LlamaForSequenceClassification reward model (no real reward model is available offline)."""
    folder = tmp_path_factory.mktemp("reward") / "rm"
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def evaluate(model: Path | str, hh: Path, tmp_path: Path, *extra: str, preference: str | None = "harmless") -> dict:
    report = tmp_path / "metrics.json"
    args = ["evaluate", "--model", str(model), "--data.path", str(hh)]
    args += ["--data.preference", preference] if preference else []
    assert run(*args, "--max_pairs", "6", "--data.max_length", "256", "--output", str(report), *extra) == 0
    return json.loads(report.read_text())


def assert_pair_metrics(metrics: dict, names: tuple[str, ...]) -> None:
    for name in names:
        assert metrics[f"{name}_ci95"] is None  # 6 pairs, fewer than stats.MIN_ITEMS: no interval
        assert metrics[f"{name}_pairs"] == metrics["pairs"] > 0
    assert metrics["pairs"] + metrics["pairs_skipped_too_long"] == 6


def test_untrained_base_reports_only_the_plain_metrics(base_folder, hh, tmp_path):
    metrics = evaluate(base_folder, hh, tmp_path)
    assert metrics["kind"] == "plain" and metrics["mode"] == "none"
    assert_pair_metrics(metrics, PAIR_METRICS)
    assert "control_accuracy" not in metrics and "dpo_reward_accuracy" not in metrics
    alias = evaluate("tiny-debug", hh, tmp_path)  # the alias is the same model
    assert alias["chosen_nll"] == pytest.approx(metrics["chosen_nll"]) and alias["logp_accuracy"] == metrics["logp_accuracy"]


def test_meet_export_reports_control_accuracy_but_no_dpo_reward(meet_export, hh, tmp_path):
    metrics = evaluate(meet_export, hh, tmp_path)
    assert metrics["kind"] == "controls" and metrics["mode"] == "harmless/good"
    assert_pair_metrics(metrics, (*PAIR_METRICS, "control_accuracy", "control_margin"))
    assert "dpo_reward_accuracy" not in metrics
    swapped = evaluate(meet_export, hh, tmp_path, "--good_control", "bad")  # preferred mode is configurable
    assert swapped["mode"] == "harmless/bad" and swapped["control_accuracy"] == pytest.approx(1 - metrics["control_accuracy"])


def test_a_file_without_preference_names_is_scored_as_the_models_only_preference(meet_export, hh, tmp_path):
    named = evaluate(meet_export, hh, tmp_path)
    unnamed = evaluate(meet_export, hh, tmp_path, preference=None)  # the hh_rlhf format names it "preference"
    assert unnamed["mode"] == "harmless/good" and unnamed["pairs"] == named["pairs"]
    assert unnamed["control_accuracy"] == named["control_accuracy"]
    assert unnamed["chosen_nll"] == pytest.approx(named["chosen_nll"])


def test_dpo_export_reports_dpo_reward_accuracy_against_its_base(dpo_export, hh, tmp_path):
    schema = json.loads((dpo_export / "meet_schema.json").read_text())
    assert schema["objective"] == "dpo" and schema["reference_model"] == "tiny-debug" and schema["dpo_beta"] == 0.1
    metrics = evaluate(dpo_export, hh, tmp_path)
    assert metrics["kind"] == "dpo" and metrics["mode"] == "none" and metrics["dpo_reference"] == "tiny-debug"
    assert_pair_metrics(metrics, (*PAIR_METRICS, "dpo_reward_accuracy"))
    assert "control_accuracy" not in metrics


def test_bad_control_choice_is_one_line_exit_2(meet_export, hh, capsys):
    args = ["evaluate", "--model", str(meet_export), "--data.path", str(hh), "--data.preference", "harmless", "--max_pairs", "2"]
    args += ["--good_control", "polite"]
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: control 'polite' is not one of harmless's") and "--good_control" in err and err.count("\n") == 1


def test_fidelity_matrix_has_a_row_per_control_and_a_kl_to_the_base(meet_export):
    model = load_for_evaluation(str(meet_export))
    prompts = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "How do I boil an egg?"}]]
    attributes = {"words": lambda p, r: len(r.split()), "has_e": lambda p, r: float("e" in r)}
    result = control_fidelity(model, prompts, attributes, base=load_model("tiny-debug"), max_new_tokens=6)
    assert result["controls"] == ["harmless/good", "harmless/bad"] and result["attributes"] == ["words", "has_e"]
    for control in result["controls"]:
        assert set(result["matrix"][control]) == {"words", "has_e"} and len(result["samples"][control]) == 2
        assert torch.isfinite(torch.tensor(result["kl_to_base"][control]))
    plain = load_for_evaluation("tiny-debug")
    same = control_fidelity(plain, prompts, base=plain.lm, max_new_tokens=6)
    assert same["controls"] == ["none"] and same["kl_to_base"]["none"] == pytest.approx(0.0, abs=1e-6)


def test_plots_are_written_as_png(meet_export, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "Tell me a joke", "Why is the sky blue?")))
    plots = tmp_path / "plots"
    args = ["evaluate", "--model", str(meet_export), "--fidelity_prompts", str(prompts), "--plots", str(plots)]
    assert run(*args, "--max_new_tokens", "6", "--output", str(tmp_path / "m.json")) == 0
    for name in ("fidelity_bars.png", "length_histograms.png", "reward_vs_kl.png"):
        png = (plots / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics["fidelity"]["kl_to_base"]) == {"harmless/good", "harmless/bad"} and "chosen_nll" not in metrics


def test_evaluate_logs_its_metrics_and_plots_to_the_chosen_tracker(meet_export, tmp_path, capsys):
    """``--logger tensorboard``: the numbers as scalars, each plot as an image, in log_dir/evaluate (and a CSV)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "Why is the sky blue?")))
    args = ["evaluate", "--model", str(meet_export), "--fidelity_prompts", str(prompts), "--plots", str(tmp_path / "p")]
    logs = tmp_path / "logs"
    assert run(*args, "--max_new_tokens", "4", "--logger", "tensorboard", "--log_dir", str(logs)) == 0
    (events,) = (logs / "evaluate" / "logs").rglob("events.out.tfevents.*")
    data = events.read_bytes()
    assert b"evaluate/fidelity/matrix/harmless/good/words" in data and b"evaluate/fidelity_bars" in data
    (csv,) = (logs / "evaluate" / "logs").rglob("metrics.csv")
    assert "evaluate/fidelity/prompts" in csv.read_text().splitlines()[0]
    assert run(*args, "--logger", "neptune") == 2 and "--logger 'neptune' is not one of" in capsys.readouterr().err


def test_plots_without_matplotlib_name_the_extra(meet_export, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    args = ["evaluate", "--model", str(meet_export), "--fidelity_prompts", str(prompts), "--plots", str(tmp_path / "p")]
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install meet_lightning[plots]" in err and not (tmp_path / "p").exists()


def test_reward_model_scores_generations_and_judges_win_rate(meet_export, reward_folder, hh, tmp_path):
    rm = RewardModel(str(reward_folder))
    prompt = [{"role": "user", "content": "Hi"}]
    scores = rm.score([prompt, prompt], ["Hello there!", "Go away."])
    assert len(scores) == 2 and scores[0] != scores[1] and scores[0] == pytest.approx(rm(prompt, "Hello there!"), abs=1e-5)
    extra = ["--reward_model", str(reward_folder), "--judge", str(reward_folder)]
    extra += ["--max_generations", "3", "--max_new_tokens", "6"]
    metrics = evaluate(meet_export, hh, tmp_path, *extra)
    assert metrics["reward_model_score_prompts"] == 3 and metrics["reward_model_score_ci95"] is None
    assert metrics["win_rate_prompts"] == 3 and 0 <= metrics["win_rate"] <= 1
    assert metrics["judge"] == f"reward_model:{reward_folder}" and metrics["generation_mode"] == "harmless/good"


JUDGES = '''
def longer(prompt, response, reference):
    """Wins when the response has more words than the reference."""
    return float(len(response.split()) > len(reference.split()))
'''


def test_judge_win_rate_with_a_python_callable(base_folder, hh, tmp_path, monkeypatch):
    prompt = [{"role": "user", "content": "Hi"}]
    result = win_rate(lambda p, r, ref: float(len(r) > len(ref)), [prompt] * 4, ["aaa", "a", "aaaa", "aa"], ["aa"] * 4)
    assert result["win_rate"] == 0.5 and result["win_rate_prompts"] == 4 and result["judge"].startswith("callable:")
    (tmp_path / "my_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = ["--judge", "my_judges:longer", "--max_generations", "2", "--max_new_tokens", "4"]
    metrics = evaluate(base_folder, hh, tmp_path, *extra)
    assert metrics["judge"] == "callable:my_judges:longer" and metrics["win_rate_prompts"] == 2


def test_sample_generations_callback_writes_its_file_during_a_debug_fit(tmp_path, hh):
    overlay = tmp_path / "samples.yaml"
    overlay.write_text(
        """
stage1:
  trainer:
    val_check_interval: 2
    callbacks:
      - class_path: meet_lightning.SampleGenerations
        init_args: {prompts: ["Hi there", "How do I boil an egg?"], max_new_tokens: 4}
"""
    )
    out = fit_recipe("ablations/stage1_only.yaml", tmp_path / "run", hh, "--config", str(overlay))
    rows = [json.loads(line) for line in (out / "stage1" / "samples.jsonl").read_text().splitlines()]
    during_training = [r for r in rows if r["step"] == 2]
    assert {(r["control"], r["prompt"]) for r in during_training} == {
        (c, p) for c in ("harmless/good", "harmless/bad") for p in ("Hi there", "How do I boil an egg?")
    }
    events = list((out / "stage1" / "logs").rglob("events.out.tfevents.*"))
    assert events and any(b"samples/harmless/good" in e.read_bytes() for e in events)
    assert any(b"samples/words" in e.read_bytes() for e in events)  # the words-per-control figure (an image)
    metrics = (out / "stage1" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/sample_words/harmless/good" in metrics and (out / "stage1" / "samples_words.png").is_file()


def test_sample_generations_works_without_a_logger_and_scores_rewards(tmp_path, shared_data, reward_folder):
    from meet_lightning.controls.tokens import PromptTuningControl
    from meet_lightning.modules import ControlTokenModule
    from meet_lightning.training.callbacks import SampleGenerations

    data = build_tiny_hh_data(shared_data, max_length=128, max_examples=32)
    module = ControlTokenModule("tiny-debug", PromptTuningControl(num_tokens=2), data.control_schema)
    samples = SampleGenerations(prompts=["Hi"], controls=["harmless/good", "none"], max_new_tokens=3,
                                reward_model=str(reward_folder), num_reward_prompts=2)  # fmt: skip
    trainer = build_cpu_trainer(tmp_path, callbacks=[samples], limit_val_batches=None)
    trainer.validate(module, data)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["control"] for r in rows] == ["harmless/good", "none"]
    assert {"val/reward/harmless/good", "val/reward/none"} <= set(trainer.callback_metrics)


def test_text_controls_of_different_lengths_score_each_pass_with_its_own_positions():
    """A longer ``bad`` phrase shifts the response: every score must equal the same row scored on its own."""
    from meet_lightning.controls.tokens import TextControl, controlled_response_logps
    from meet_lightning.data.rows import ControlledExample, ControlSchema, PreferencePair
    from meet_lightning.data.tokenization import PromptTokenizer, collate_rows
    from meet_lightning.evaluation.metrics import EvalModel, score_pairs
    from meet_lightning.losses import sequence_logps

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    lm = build_tiny_model(tokenizer).eval()
    schema = ControlSchema.from_dict({"harmless": ["good", "bad"]})
    control = TextControl({"good": "Good:", "bad": "A much longer bad phrase here:"})
    control.setup(lm, tokenizer, schema)
    model = EvalModel("tiny", lm, tokenizer, control, schema)
    pairs = [
        PreferencePair(({"role": "user", "content": f"question {i}?"},), "yes " * (i + 1), "no", "harmless") for i in range(3)
    ]
    scores, too_long = score_pairs(model, pairs, max_length=128)

    encoder = PromptTokenizer(tokenizer, 128)

    def alone(pair: PreferencePair, response: str, label: str) -> tuple[float, int]:
        row = encoder.tokenize(ControlledExample(pair.prompt, response, {"harmless": label}), schema)
        with torch.no_grad():
            tokens, mask = controlled_response_logps(lm, control, collate_rows([row], tokenizer.pad_token_id))
        return float(sequence_logps(tokens, mask)), int(mask.sum())

    assert too_long == 0
    for i, pair in enumerate(pairs):
        (cg, n_c), (cb, _), (rg, n_r), (rb, _) = (
            alone(pair, r, c) for r in (pair.chosen, pair.rejected) for c in ("good", "bad")
        )
        assert scores["control_margin"][i] == pytest.approx((cg - cb) - (rg - rb), abs=1e-4)
        assert scores["chosen_nll"][i] == pytest.approx(-cg / n_c, abs=1e-5)
        assert scores["logp_accuracy"][i] == float(cg / n_c > rg / n_r)


def test_evaluate_scores_through_the_tokenized_cache_like_the_in_memory_path(meet_export, hh, tmp_path):
    from meet_lightning.data.formats import SourceConfig
    from meet_lightning.evaluation.metrics import evaluate_pairs, read_pairs, score_pairs, tokenized_pairs

    model = load_for_evaluation(str(meet_export))
    source = SourceConfig(path=str(hh), preference="harmless")
    cache = tmp_path / "cache"
    # batch 1: no padding, so the two paths' numbers are equal, not merely close (4 of the 10 pairs are too long)
    first = evaluate_pairs(model, source, max_pairs=10, max_length=256, batch_size=1, cache_dir=str(cache))
    data = tokenized_pairs(model, source, 256, 10, str(cache))
    assert not data.built and first["data_cache"] == str(data.path)  # the second call memory-maps the first's folder
    assert data.path.parent == cache
    # The file's first 10 pairs (no shuffle), scored exactly as the pairs read and tokenized in memory.
    scores, too_long = score_pairs(model, read_pairs(source, 10), max_length=256, batch_size=1)
    assert first["pairs"] == len(scores["chosen_nll"]) and first["pairs_skipped_too_long"] == too_long
    for name in ("control_accuracy", "control_margin", "chosen_nll", "logp_accuracy"):
        assert first[name] == pytest.approx(sum(scores[name]) / len(scores[name]), abs=1e-6)
    other = evaluate_pairs(model, source, 10, 256, batch_size=1, good_control="bad", cache_dir=str(cache))
    assert other["data_cache"] == first["data_cache"]  # other controls, same tokenized rows
    assert other["control_accuracy"] == pytest.approx(1 - first["control_accuracy"])


def test_scores_come_back_in_the_pairs_order_although_batches_are_length_sorted(meet_export, hh):
    from meet_lightning.data.formats import SourceConfig
    from meet_lightning.evaluation.metrics import read_pairs, score_pairs

    model = load_for_evaluation(str(meet_export))
    pairs = read_pairs(SourceConfig(path=str(hh), preference="harmless"), 12)
    one_by_one, _ = score_pairs(model, pairs, max_length=384, batch_size=1)
    sorted_batches, _ = score_pairs(model, pairs, max_length=384, batch_size=4)
    margins = one_by_one["control_margin"]
    ordered = sorted(margins)
    assert len(margins) >= 8 and min(b - a for a, b in zip(ordered, ordered[1:], strict=False)) > 1e-2  # a permutation would show
    # other batch shapes sum response log-probs (~-500) in another order: fp32 noise of ~1e-4, far below the
    # gaps between pairs (≥ 0.01 here) that a wrong order would show
    torch.testing.assert_close(torch.tensor(sorted_batches["control_margin"]), torch.tensor(margins), rtol=0, atol=1e-3)


def test_response_control_margins_split_the_pair_classifier_per_response(meet_export, hh):
    """A response's margin log p(y|good) − log p(y|bad): a pair's control_margin is chosen's minus rejected's."""
    from meet_lightning.data.formats import SourceConfig
    from meet_lightning.evaluation.metrics import read_pairs, response_control_margins, score_pairs

    model = load_for_evaluation(str(meet_export))
    pairs = read_pairs(SourceConfig(path=str(hh), preference="harmless"), 40)
    pairs = [p for p in pairs if len(str(p.prompt)) + max(len(p.chosen), len(p.rejected)) < 1500][:6]  # no prompt cut
    scores, too_long = score_pairs(model, pairs, max_length=2048, batch_size=3)
    prompts = [p.prompt for p in pairs]
    chosen, chosen_tokens = response_control_margins(
        model, prompts, [p.chosen for p in pairs], "harmless", max_length=2048, batch_size=4
    )
    rejected, _ = response_control_margins(model, prompts, [p.rejected for p in pairs], "harmless", max_length=2048, batch_size=2)
    assert len(pairs) == 6 and too_long == 0 and all(n > 0 for n in chosen_tokens)
    assert len(set(chosen)) == 6  # six different values: a wrong pairing of rows would show
    expected = torch.tensor(scores["control_margin"])
    torch.testing.assert_close(torch.tensor(chosen) - torch.tensor(rejected), expected, rtol=0, atol=1e-3)
    empty, count = response_control_margins(model, prompts[:2], ["  ", pairs[1].chosen], "harmless", max_length=2048)
    assert empty[0] != empty[0] and count[0] == 0 and empty[1] == pytest.approx(chosen[1], abs=1e-3)
