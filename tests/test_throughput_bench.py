"""``benchmarks/throughput.py`` on the tiny model: every arm runs, and the JSON holds every key with sane numbers.

The arms run in this process (``--in-process``): a subprocess per arm would cost ~5 s of imports each. TRL arms
run only where ``trl`` is installed (``pip install -e .[bench]``); CI installs ``.[dev]`` and skips them.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    """The benchmark script as a module (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("throughput_benchmark", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()
HAS_TRL = importlib.util.find_spec("trl") is not None
QUICK = [
    "--model", "tiny-debug", "--steps", "2", "--warmup-steps", "1", "--windows", "1", "--threads", "1",
    "--in-process", "--peak-size", "256", "--pool-pairs", "16", "--accuracy-pairs", "4", "--max-length", "512",
    "--gen-tokens", "8", "--scoring-pairs", "8",
]  # fmt: skip
KEYS = (
    "stage2_vs_trl_dpo_pairs_per_s",
    "stage2_infix_vs_trl_dpo_pairs_per_s",
    "stage2_vs_trl_sft_tokens_per_s",
    "stage1_vs_stage2_tokens_per_s",
    "stage1_vs_trl_prompt_tuning_tokens_per_s",
    "stage2_peak_rss_vs_trl_dpo",
    "stage2_mfu",
    "padding_fraction",
    "stage2_prefix_control_accuracy",
    "stage2_infix_control_accuracy",
    "generation_vs_transformers_tokens_per_s",
    "generation_vs_transformers_tokens_per_s_batch1",
    "generation_vs_transformers_tokens_per_s_batch8",
    "scoring_speedup_vs_fp32",
    "scoring_vs_transformers_pairs_per_s",
    "generation_static_cache_vs_dynamic_batch1",
    "generation_static_cache_vs_dynamic_batch8",
)


def run_benchmark(tmp_path: Path, shared_data: Path, arms: list[str], *extra: str) -> dict:
    """Runs the benchmark's CLI in process; returns the JSON it wrote (and asserts it succeeded)."""
    out = tmp_path / "throughput.json"
    data = shared_data / "hh_rlhf_harmless.train.jsonl.gz"
    code = bench.main([*QUICK, "--data", str(data), "--arms", ",".join(arms), "--json", str(out), *extra])
    summary = json.loads(out.read_text())
    assert code == 0, summary["problems"]
    return summary


def check_arm(arm: dict, steps: int = 3) -> None:
    """Positive rates, the raw per-step timings in the JSON, the asked-for shared settings, a falling loss.

    Speeds are checked for sign only: a busy machine or a CPU generation must not fail a test (an MFU above 1 is
    what a contended peak measurement gives, not a defect of the arm).
    """
    assert arm["tokens_per_s"] > 0 and arm["pairs_per_s"] > 0 and arm["peak_rss_mb"] > 0
    assert arm["mfu"] > 0 and 0 <= arm["padding_fraction"] < 1
    assert len(arm["windows"]) == 1 and len(arm["windows"][0]["steps_raw"]) == steps
    assert arm["settings"]["rows_per_step"] == 8 and arm["settings"]["precision"] == "32-true"  # auto, as resolved
    assert arm["settings"]["threads"] == 1 and arm["settings"]["gradient_checkpointing"] is False
    assert arm["loss_fell"], arm["losses"]


def test_library_arms_generation_and_scoring(tmp_path, shared_data):
    arms = [*bench.LIBRARY_ARMS, "generation", "scoring"]
    summary = run_benchmark(tmp_path, shared_data, arms)
    assert set(KEYS) <= set(summary)
    for name in bench.LIBRARY_ARMS:
        check_arm(summary["arms"][name])
    assert summary["stage1_vs_stage2_tokens_per_s"] > 0 and summary["stage2_mfu"] > 0
    assert summary["precision"]["precision"] == "32-true" and summary["precision"]["peak_dtype"] == "float32"
    assert summary["precision"]["cpu_capability"] and summary["precision"]["reason"].startswith("auto: ")
    assert summary["arms"]["generation"]["settings"]["dtype"] == "float32"
    assert 0 <= summary["stage2_prefix_control_accuracy"] <= 1 and 0 <= summary["stage2_infix_control_accuracy"] <= 1
    assert summary["generation_vs_transformers_tokens_per_s"] > 0
    assert summary["generation_vs_transformers_tokens_per_s_batch1"] > 0
    assert summary["generation_static_cache_vs_dynamic_batch1"] > 0 and summary["generation_static_cache_vs_dynamic_batch8"] > 0
    scoring = summary["arms"]["scoring"]
    assert summary["scoring_speedup_vs_fp32"] > 0 and summary["scoring_vs_transformers_pairs_per_s"] > 0
    assert summary["scoring_infix_speedup_vs_fp32"] > 0
    paths = {"meet", "fp32_unsorted", "transformers", "meet_infix", "fp32_unsorted_infix"}
    assert scoring["settings"]["pairs"] == 8 and set(scoring["pairs_per_s"]) == paths
    # every path computes its baseline's control margins (fp32 here): the plain transformers rewrite is a fair comparison
    assert max(scoring["max_margin_gap_vs_fp32"].values()) < 1e-3
    assert summary["arms"]["generation"]["identical_outputs"] == 1.0  # same model, same greedy settings
    assert summary["stage2_vs_trl_dpo_pairs_per_s"] is None  # TRL arms not asked for


def test_all_logits_lever_changes_cost_not_loss(tmp_path, shared_data):
    base = run_benchmark(tmp_path, shared_data, ["stage2_prefix"])["arms"]["stage2_prefix"]
    full = run_benchmark(tmp_path, shared_data, ["stage2_prefix"], "--all-logits")["arms"]["stage2_prefix"]
    assert full["settings"]["all_logits"] is True
    assert full["losses"][0][0] == pytest.approx(base["losses"][0][0], abs=1e-2)
    base_positions = sum(s["logit_positions"] for s in base["windows"][0]["steps_raw"])
    assert sum(s["logit_positions"] for s in full["windows"][0]["steps_raw"]) > base_positions


def test_forward_chunks_lever_changes_padding_not_loss(tmp_path, shared_data):
    one = run_benchmark(tmp_path, shared_data, ["stage2_prefix"], "--forward-chunks", "1")["arms"]["stage2_prefix"]
    four = run_benchmark(tmp_path, shared_data, ["stage2_prefix"])["arms"]["stage2_prefix"]
    assert (one["settings"]["forward_chunks"], four["settings"]["forward_chunks"]) == (1, 4)
    assert four["losses"][0][0] == pytest.approx(one["losses"][0][0], abs=1e-5)
    assert one["windows"][0]["tokens"] == four["windows"][0]["tokens"]  # the same batches
    assert 0 <= four["padding_fraction"] < one["padding_fraction"]


def test_shared_prompt_lever_keeps_the_loss(tmp_path, shared_data):
    shared = run_benchmark(tmp_path, shared_data, ["stage2_infix"], "--shared-prompt")["arms"]["stage2_infix"]
    full = run_benchmark(tmp_path, shared_data, ["stage2_infix"])["arms"]["stage2_infix"]
    assert (shared["settings"]["shared_prompt"], full["settings"]["shared_prompt"]) == (True, False)
    assert shared["losses"][0][0] == pytest.approx(full["losses"][0][0], abs=1e-5)
    assert shared["windows"][0]["tokens"] == full["windows"][0]["tokens"]  # the same batches


def test_backward_per_chunk_lever_keeps_the_loss(tmp_path, shared_data):
    parts = run_benchmark(tmp_path, shared_data, ["stage2_prefix"])["arms"]["stage2_prefix"]
    one = run_benchmark(tmp_path, shared_data, ["stage2_prefix"], "--one-backward")["arms"]["stage2_prefix"]
    assert (parts["settings"]["backward_per_chunk"], one["settings"]["backward_per_chunk"]) == (True, False)
    assert parts["losses"][0][0] == pytest.approx(one["losses"][0][0], abs=1e-5)
    assert parts["windows"][0]["tokens"] == one["windows"][0]["tokens"]  # the same batches


def test_pack_rows_lever_keeps_the_loss(tmp_path, shared_data):
    packed = run_benchmark(tmp_path, shared_data, ["stage2_prefix"], "--pack-rows", "--forward-chunks", "1")
    padded = run_benchmark(tmp_path, shared_data, ["stage2_prefix"], "--forward-chunks", "1")
    packed, padded = packed["arms"]["stage2_prefix"], padded["arms"]["stage2_prefix"]
    assert (packed["settings"]["pack_rows"], padded["settings"]["pack_rows"]) == (True, False)
    assert packed["losses"][0][0] == pytest.approx(padded["losses"][0][0], abs=1e-5)
    assert packed["windows"][0]["tokens"] == padded["windows"][0]["tokens"]  # the same batches


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_is_refused_in_one_line_where_there_is_none(capsys, shared_data):
    data = str(shared_data / "hh_rlhf_harmless.train.jsonl.gz")
    assert bench.main([*QUICK, "--data", data, "--arms", "stage2_prefix", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --device cuda: no CUDA device here — run it on a GPU machine, or leave --device out"
    )
    assert bench.main([*QUICK, "--data", data, "--arms", "stage2_prefix,scoring", "--device", "cuda"]) == 2
    assert "the generation and scoring arms run on the CPU only — leave them out" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install -e .[bench])")
def test_trl_arms_and_ratios(tmp_path, shared_data):
    arms = [*bench.TRL_ARMS, "stage1_prompt", "stage2_prefix", "stage2_infix"]
    summary = run_benchmark(tmp_path, shared_data, arms)
    for name in arms:
        check_arm(summary["arms"][name])
    for key in KEYS[:6]:
        assert summary[key] > 0, key
    # every arm timed the same pairs in the same batches (TRL renders one extra newline token per row)
    tokens = {name: summary["arms"][name]["windows"][0]["tokens"] for name in arms}
    assert max(tokens.values()) - min(tokens.values()) <= 2 * 8 * 2


def test_flops_per_token_match_the_definitions():
    dims = {"N": 1000, "L": 2, "d": 8, "V": 50}
    # one 10-token row, logits at 4 positions: 6N per token + 12·L·d·T per token + 6·d·V per logit position
    assert bench.step_flops(dims, 3, False, [10], 4) == 6 * 1000 * 10 + 12 * 2 * 8 * 10 * 10 + 6 * 8 * 50 * 4
    assert bench.step_flops(dims, 2, True, [10], 4) == 3 * (2 * 1000 * 10 + 4 * 2 * 8 * 100 + 2 * 8 * 50 * 4)


def test_unknown_arm_is_one_line_error(capsys):
    assert bench.main(["--arms", "stage3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown arm(s) stage3") and "\n" not in err


@pytest.mark.slow  # ~70 s: inductor compiles the tiny model's forward and backward from an empty cache
def test_compiled_arm_reports_speedup_compile_seconds_and_payback(tmp_path, shared_data):
    summary = run_benchmark(tmp_path, shared_data, ["stage1_prompt", "stage1_prompt_compiled"])
    compiled = summary["arms"]["stage1_prompt_compiled"]
    check_arm(compiled)
    assert compiled["settings"]["compiled"] is True and summary["arms"]["stage1_prompt"]["settings"]["compiled"] is False
    # the same batches and the same numbers: compiling changes the speed, not what is computed
    eager = summary["arms"]["stage1_prompt"]
    assert compiled["windows"][0]["tokens"] == eager["windows"][0]["tokens"]
    assert compiled["losses"][0][0] == pytest.approx(eager["losses"][0][0], abs=1e-4)
    report = summary["compile"]["stage1_prompt"]
    assert report["speedup"] > 0 and compiled["warmup_seconds"] > 0
    assert report["compile_seconds"] == pytest.approx(compiled["warmup_seconds"] - eager["warmup_seconds"])
    assert report["payback_steps"] is None or report["payback_steps"] >= 0
    assert report["graphs_traced_in_warmup"] > 0 and report["graphs_traced_in_measured_steps"] >= 0
    assert all(step["graphs"] == 0 for step in eager["windows"][0]["steps_raw"])  # the eager arm traced nothing


def test_rss_phases_prints_the_resident_set_at_every_phase_of_a_step(tmp_path, shared_data, capsys, monkeypatch):
    """``benchmarks/rss_phases.py``: a library arm through throughput's CLI, with a peak and a current resident set
    at each forward chunk, backward and step end, and after ``malloc_trim`` with ``--malloc-trim``."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("rss_phases", REPO / "benchmarks" / "rss_phases.py")
    phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phases)
    data = shared_data / "hh_rlhf_harmless.train.jsonl.gz"
    argv = [*QUICK, "--data", str(data), "--arms", "stage2_prefix", "--json", str(tmp_path / "t.json"), "--malloc-trim"]
    assert phases.main(argv) == 0
    lines = [re.match(r"rss (.+?) +(?:peak +(\d+) MiB +)?now +(\d+) MiB", line) for line in capsys.readouterr().out.splitlines()]
    seen = {m[1] for m in lines if m}
    assert {"fit start", "forward", "backward", "before step", "step 0 end", "step 2 end", "trimmed"} <= seen, seen
    assert all(int(m[3]) > 0 and (m[1] == "trimmed" or int(m[2]) > 0) for m in lines if m)
    assert phases.throughput.library_trainer is not bench.library_trainer  # the printer went into the run's module
