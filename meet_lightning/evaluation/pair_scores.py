"""Pairwise metrics: every preference pair scored by the model, in batches of similar length.

:func:`score_pairs` (or :func:`score_tokenized`, over the tokenized-data cache) gives per-pair values of the
control classifier, the DPO implicit reward, ``chosen_nll`` and ``logp_accuracy``; :func:`evaluate_pairs`
summarizes them with intervals and :func:`evaluate_model` is the Python form of ``evaluate --data.path``. What
each metric means is in :mod:`meet_lightning.evaluation.metrics`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from meet_lightning.controls.tokens import controlled_response_logps, plain_logps
from meet_lightning.data.cache import DataSpec, TokenizedData, prepare_tokenized
from meet_lightning.data.formats import DEFAULT_PREFERENCE, SourceConfig, read_source
from meet_lightning.data.rows import ControlSchema, Message, PreferencePair
from meet_lightning.data.tokenization import PromptTokenizer, TokenizedRow, collate_pairs
from meet_lightning.errors import ConfigError, DataError
from meet_lightning.evaluation.loading import NO_CONTROL, EvalModel, load_for_evaluation, load_reference
from meet_lightning.evaluation.summary import summarize
from meet_lightning.losses import control_classifier_scores, pairwise_accuracy, sequence_logps

CHUNKS = 4
"""Forward passes per scored batch, cut by length (:func:`~meet_lightning.controls.tokens.length_chunks`): less padding."""


def model_preference(model: EvalModel, preference: str) -> str:
    """``preference``, or the model's only preference when the data has the default name.

    Files without a preference column name theirs ``preference``: a model trained on such a file with
    ``--data.preference harmless`` should score that file without the flag again.
    """
    names = model.schema.preferences if model.has_controls else {}
    if preference == DEFAULT_PREFERENCE and len(names) == 1 and DEFAULT_PREFERENCE not in names:
        return next(iter(names))
    return preference


def pair_controls(
    model: EvalModel, preference: str, chosen: str, rejected: str, good: str | None, bad: str | None
) -> tuple[str, str]:
    """The controls a pair is scored under: ``good`` (preferred mode) for chosen, ``bad`` for rejected.

    ``chosen``/``rejected`` are the pair's own labels (the defaults when ``good``/``bad`` are not given).
    """
    labels = model.schema.preferences.get(preference)
    if labels is None:
        raise ConfigError(
            f"the model has no preference {preference!r} (it has {', '.join(model.schema.preferences)}) — pass --data.preference with one of them"
        )
    good = good or chosen
    if bad is None:
        others = [label for label in labels if label != good]
        bad = others[0] if len(labels) == 2 and len(others) == 1 else rejected
    for flag, label in (("--good_control", good), ("--bad_control", bad)):
        if label not in labels:
            raise ConfigError(
                f"control {label!r} is not one of {preference}'s ({', '.join(labels)}) — pass {flag} with one of them"
            )
    return good, bad


RowPair = tuple[TokenizedRow, TokenizedRow]


def under_model_controls(
    model: EvalModel, rows: RowPair, data_schema: ControlSchema, good: str | None, bad: str | None
) -> RowPair:
    """A tokenized pair (its ids in ``data_schema``) with the ids of the controls ``model`` scores it under.

    Rows are tokenized without their controls (the model splices them in), so only ``control_ids`` change.
    """
    chosen, rejected = rows
    if not model.has_controls:
        return replace(chosen, control_ids=()), replace(rejected, control_ids=())
    ((preference, chosen_label),) = data_schema.decode(chosen.control_ids).items()  # a pair has one preference
    rejected_label = data_schema.decode(rejected.control_ids)[preference]
    preference = model_preference(model, preference)
    good, bad = pair_controls(model, preference, chosen_label, rejected_label, good, bad)
    return (
        replace(chosen, control_ids=tuple(model.schema.encode({preference: good}))),
        replace(rejected, control_ids=tuple(model.schema.encode({preference: bad}))),
    )


def _pair_rows(model: EvalModel, encoder: PromptTokenizer, pair: PreferencePair, good: str | None, bad: str | None):
    """Chosen (under ``good``) and rejected (under ``bad``) rows with one prompt; ``None`` when they do not fit."""
    schema = ControlSchema.from_dict({pair.preference: [pair.chosen_control, pair.rejected_control]})
    rows = encoder.tokenize_pair(pair, schema)
    return None if rows is None else under_model_controls(model, rows, schema, good, bad)


@torch.no_grad()
def score_pairs(
    model: EvalModel,
    pairs: Sequence[PreferencePair],
    max_length: int = 512,
    batch_size: int = 8,
    good_control: str | None = None,
    bad_control: str | None = None,
    reference: nn.Module | None = None,
    progress: bool = False,
    sort_by_length: bool = True,
    chunks: int = CHUNKS,
    share_prompt: bool = True,
) -> tuple[dict[str, list[float]], int]:
    """Per-pair scores, and the number of pairs too long to score (``progress``: pairs scored and pairs/s on stderr).

    ``sort_by_length`` batches pairs of similar length (values still come back in the pairs' order) and
    ``chunks`` cuts each forward by length (:data:`CHUNKS`); both only save padding. ``share_prompt``: a pair's
    rows (both responses, under both controls) continue from one pass over their prompt where the control allows
    (:mod:`~meet_lightning.controls.shared_prompt`: infix, text or no controls) and it computes fewer tokens; the
    same values. ``False``/``1``/``False``: the plain batches, the benchmark's baseline.

    Returns ``chosen_nll`` and ``logp_accuracy`` (preferred mode) for every model, ``control_accuracy`` and
    ``control_margin`` for models with controls, ``dpo_reward_accuracy`` and ``dpo_reward_margin`` when a
    ``reference`` is given (DPO exports). :func:`score_tokenized` is the same over cached, tokenized pairs.
    """
    encoder = PromptTokenizer(model.tokenizer, max_length)
    rows = [_pair_rows(model, encoder, p, good_control, bad_control) for p in pairs]
    lengths = [len(r[0].input_ids) + len(r[1].input_ids) if r else 0 for r in rows]
    lengths = lengths if sort_by_length else [0] * len(rows)  # a stable sort of equal keys keeps the input order
    fetch = lambda index: [rows[i] for i in index]  # noqa: E731
    return _score_sorted(model, fetch, lengths, batch_size, reference, progress, chunks, share_prompt)


@torch.no_grad()
def score_tokenized(
    model: EvalModel,
    data: TokenizedData,
    batch_size: int = 8,
    good_control: str | None = None,
    bad_control: str | None = None,
    reference: nn.Module | None = None,
    progress: bool = False,
) -> tuple[dict[str, list[float]], int]:
    """:func:`score_pairs` over the validation pairs of a :func:`tokenized_pairs` cache (read a batch at a time)."""
    items, schema = data.val, ControlSchema.from_dict(data.schema)

    def fetch(index: list[int]) -> list[RowPair]:
        return [under_model_controls(model, rows, schema, good_control, bad_control) for rows in items.__getitems__(index)]

    scores, _ = _score_sorted(model, fetch, items.lengths(), batch_size, reference, progress)
    return scores, data.summary.get("val: dropped, a response longer than max_length", 0)


def _score_sorted(
    model: EvalModel,
    fetch: Callable[[list[int]], list[RowPair | None]],
    lengths: Sequence[int],
    batch_size: int,
    reference: nn.Module | None,
    progress: bool,
    chunks: int = CHUNKS,
    share_prompt: bool = True,
) -> tuple[dict[str, list[float]], int]:
    """Scores pairs in batches of similar length, returned in the pairs' own order (``None``: too long, counted).

    Sorting by length leaves little padding in a batch; the per-pair values keep the input order, so two models
    scored on one file stay paired item by item.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: dict[str, list[float]] = {}
    scored: list[int] = []  # the input position of each value, in the order computed
    too_long = 0
    bar = None  # drawn once the first batch is built: a bad control choice stays a one-line error
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            rows = fetch(index)
            if bar is None:
                bar = tqdm(total=len(order), desc="score", unit="pair", disable=not progress, file=sys.stderr)
            bar.update(len(rows))
            too_long += sum(r is None for r in rows)
            kept = [(i, r) for i, r in zip(index, rows, strict=True) if r is not None]
            if not kept:
                continue
            scored += [i for i, _ in kept]
            batch = collate_pairs([r for _, r in kept], model.tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            for name, values in _score_batch(model, batch, len(kept), reference, chunks, share_prompt).items():
                out.setdefault(name, []).extend(values)
    finally:
        if bar is not None:
            bar.close()
    back = sorted(range(len(scored)), key=scored.__getitem__)
    return {name: [values[j] for j in back] for name, values in out.items()}, too_long


def _score_batch(
    model: EvalModel, batch: Mapping[str, torch.Tensor], n: int, reference: nn.Module | None, chunks: int, share: bool
) -> dict[str, list]:
    scores: dict[str, list] = {}
    if model.has_controls:
        # every response under its own control (chosen|good, rejected|bad), then under the other: one batch of 4B
        # rows, [chosen; rejected; chosen; rejected], whose four rows per pair can share one pass over the prompt
        ids = batch["control_ids"]
        both = {key: value if key == "num_pairs" else torch.cat([value, value]) for key, value in batch.items()}
        controls = torch.cat([ids, ids[n:], ids[:n]])  # (4B, P)
        tokens, mask = controlled_response_logps(
            model.lm, model.control, both, controls, fp32_head=True, chunks=chunks, share_prompt=share
        )
        # Each row keeps its own mask: text controls of different lengths put the response at different positions.
        own_mask, other_mask = mask[: 2 * n], mask[2 * n :]
        own, other = sequence_logps(tokens[: 2 * n], own_mask), sequence_logps(tokens[2 * n :], other_mask)  # (2B,)
        chosen = control_classifier_scores(own[:n], other[:n])
        rejected = control_classifier_scores(other[n:], own[n:])
        scores["control_accuracy"] = pairwise_accuracy(chosen, rejected).tolist()
        scores["control_margin"] = (chosen - rejected).tolist()
        policy = torch.cat([own[:n], other[n:]])  # both responses under the good control
        counts = torch.cat([own_mask[:n].sum(-1), other_mask[n:].sum(-1)])
    else:
        tokens, mask = plain_logps(model.lm, batch, fp32_head=True, chunks=chunks, share_prompt=share)
        policy, counts = sequence_logps(tokens, mask), mask.sum(-1)
    per_token = policy / counts.clamp(min=1)  # (2B,) [chosen; rejected] mean log-prob per token
    scores["chosen_nll"] = (-per_token[:n]).tolist()  # response_nll of the chosen side
    scores["logp_accuracy"] = pairwise_accuracy(per_token[:n], per_token[n:]).tolist()
    if reference is not None:
        beta = float(model.info.get("dpo_beta", 1.0))
        base = sequence_logps(*plain_logps(reference, batch, fp32_head=True, chunks=chunks, share_prompt=share))
        chosen_reward, rejected_reward = beta * (policy[:n] - base[:n]), beta * (policy[n:] - base[n:])
        scores["dpo_reward_accuracy"] = pairwise_accuracy(chosen_reward, rejected_reward).tolist()
        scores["dpo_reward_margin"] = (chosen_reward - rejected_reward).tolist()
    return scores


@torch.no_grad()
def response_control_margins(
    model: EvalModel,
    prompts: Sequence[Sequence[Message]],
    responses: Sequence[str],
    preference: str,
    good: str = "good",
    bad: str = "bad",
    max_length: int = 512,
    batch_size: int = 8,
) -> tuple[list[float], list[int]]:
    """MEET's control classifier on single responses (a judge of generated text): per response the summed
    ``log p(y|x, good) − log p(y|x, bad)`` and its token count (``nan`` and 0 where it is empty or does not fit).

    Each response is scored as a pair with itself, chosen under ``good`` and rejected under ``bad``, so the two
    rows share one cut prompt as in :func:`score_pairs`.
    """
    if not model.has_controls:
        raise ConfigError(f"{model.name}: response_control_margins needs a model with controls — this one has none")
    encoder = PromptTokenizer(model.tokenizer, max_length)
    margins, counts = [float("nan")] * len(responses), [0] * len(responses)
    rows = [
        _pair_rows(model, encoder, PreferencePair(tuple(p), r, r, preference, good, bad), good, bad) if r.strip() else None
        for p, r in zip(prompts, responses, strict=True)
    ]
    kept = [i for i, r in enumerate(rows) if r is not None]
    for start in range(0, len(kept), batch_size):
        index = kept[start : start + batch_size]
        batch = collate_pairs([rows[i] for i in index], model.tokenizer.pad_token_id)  # [y|good; y|bad]
        batch = {k: v.to(model.device) for k, v in batch.items()}
        tokens, mask = controlled_response_logps(model.lm, model.control, batch, fp32_head=True, chunks=CHUNKS)
        logps, n = sequence_logps(tokens, mask), len(index)  # (2n,)
        for j, i in enumerate(index):
            margins[i] = float(control_classifier_scores(logps[j], logps[n + j]))
            counts[i] = int(mask[j].sum())
    return margins, counts


def no_pairs(source: SourceConfig) -> DataError:
    """The error of a source that holds no pairs to score."""
    return DataError(f"{source.path}: no pairs to evaluate — evaluate needs pairwise data (chosen/rejected)")


def read_pairs(source: SourceConfig, max_pairs: int | None) -> list[PreferencePair]:
    """The first ``max_pairs`` pairs of ``source``; DataError when it holds none."""
    pairs = read_source(source).pairs[:max_pairs]
    if not pairs:
        raise no_pairs(source)
    return pairs


def tokenized_pairs(
    model: EvalModel, source: SourceConfig, max_length: int, max_pairs: int | None, cache_dir: str | None = None
) -> TokenizedData:
    """The first ``max_pairs`` pairs of ``source`` tokenized for ``model``, through the tokenized-data cache.

    The same folder serves every model with this tokenizer (controls are spliced in by the model, not written
    into the rows), so scoring several arms on one file, or the file a run trained on, reads and tokenizes it
    once. DataError when the source holds no pairs.
    """
    spec = DataSpec(sources=(source,), max_length=max_length, max_val_examples=max_pairs, held_out_only=True)
    data = prepare_tokenized(spec, model.tokenizer, cache_dir)
    if not data.val.paired:
        raise no_pairs(source)
    return data


def evaluate_pairs(
    model: EvalModel,
    source: SourceConfig,
    max_pairs: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    good_control: str | None = None,
    bad_control: str | None = None,
    reference_model: str | None = None,
    progress: bool = False,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Pairwise metrics of ``model`` on ``source``, each with its interval and pair count."""
    data = tokenized_pairs(model, source, max_length, max_pairs, cache_dir)
    reference = load_reference(model, reference_model) if model.is_dpo else None
    scores, too_long = score_tokenized(model, data, batch_size, good_control, bad_control, reference, progress)
    metrics: dict[str, Any] = {
        "data": source.path,
        "data_cache": str(data.path),
        "pairs": len(scores.get("chosen_nll", [])),
        "pairs_skipped_too_long": too_long,
    }
    for name, values in scores.items():
        metrics.update(summarize(name, values))
    if model.is_dpo:
        metrics["dpo_reference"] = reference_model or model.info.get("reference_model") or model.info.get("base_model")
    return metrics


def preferred_mode(model: EvalModel, preference: str | None = None, good_control: str | None = None) -> str:
    """The control a model generates under by default: ``preference/good`` for control models, else ``none``."""
    if not model.has_controls:
        return NO_CONTROL
    preference = preference or next(iter(model.schema.preferences))
    labels = model.schema.preferences.get(preference, ())
    label = good_control or ("good" if "good" in labels else labels[0] if labels else "good")
    return f"{preference}/{label}"


def evaluate_model(
    folder: str,
    source: SourceConfig,
    max_pairs: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    good_control: str | None = None,
    bad_control: str | None = None,
    reference_model: str | None = None,
) -> dict[str, Any]:
    """Pairwise metrics for ``folder`` on ``source``: the Python form of ``evaluate --model --data.path``."""
    model = load_for_evaluation(folder)
    head = {"model": folder, "kind": model.kind, "mode": preferred_mode(model, source.preference, good_control)}
    return {
        **head,
        **evaluate_pairs(model, source, max_pairs, max_length, batch_size, good_control, bad_control, reference_model),
    }
