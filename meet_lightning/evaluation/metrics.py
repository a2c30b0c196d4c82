"""Offline evaluation of an exported (or plain Hugging Face) model: pairwise metrics, control fidelity, rewards.

Every metric is named by its scorer and never mixed with another:

* ``control_accuracy`` (and ``control_margin``): MEET's control classifier
  ``log p(y|x, good) − log p(y|x, bad)``; only for models whose controls change the input (prompt tuning,
  LoRA, text and special-token controls).
* ``dpo_reward_accuracy`` (and ``dpo_reward_margin``): the implicit DPO reward
  ``β · (log π(y|x) − log π_ref(y|x))``; only for DPO exports, against the reference their schema names.
* ``chosen_nll`` and ``logp_accuracy``: every model, in its *preferred mode* — its ``good`` control
  (``--good_control`` picks another), the Chain-of-Hindsight good phrase, or plain for models without
  controls. Per-token, so lengths do not decide: ``chosen_nll`` is the mean over chosen responses of each
  response's mean token NLL (:func:`~meet_lightning.losses.response_nll`), as ``val/chosen_nll`` is.

Each comes with its pair count and a 95 % interval: Wilson for accuracies and the win rate, bootstrap for
means, ``None`` below 20 pairs (too few for any interval to mean something). Generation-based metrics: the
control-fidelity matrix (rows: controls, columns: attribute functions such as word count or a reward model) with
a KL estimate to the base model per control, ``reward_model_score`` of generations under a Hugging Face
sequence-classification reward model, and ``win_rate`` against reference responses under a pluggable judge.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from meet_lightning.controls.tokens import ControlTokens, controlled_response_logps, plain_logps
from meet_lightning.data.cache import DataSpec, TokenizedData, prepare_tokenized
from meet_lightning.data.formats import DEFAULT_PREFERENCE, SourceConfig, read_source
from meet_lightning.data.rows import ControlledExample, ControlSchema, Message, PreferencePair
from meet_lightning.data.tokenization import PromptTokenizer, TokenizedRow, collate_pairs, collate_rows
from meet_lightning.errors import CheckpointError, ConfigError, DataError
from meet_lightning.inference.export import SCHEMA_FILE, AlignedModel
from meet_lightning.inference.generation import DecodingOptions, generate_responses, resolve_controls
from meet_lightning.losses import control_classifier_scores, pairwise_accuracy, sequence_logps
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint
from meet_lightning.precision import resolve_dtype
from meet_lightning.stats import mean_interval, proportion_interval, words

Attribute = Callable[[Sequence[Message], str], float]
"""An attribute function: ``(prompt messages, response) → value`` (word count, a reward, …)."""

Judge = Callable[[Sequence[Message], str, str], float]
"""A judge: ``(prompt, response, reference) → 1.0`` if the response wins, ``0.5`` on a tie, ``0.0`` if it loses
(any value in between is read as the probability that it wins)."""

CHUNKS = 4
"""Forward passes per scored batch, cut by length (:func:`~meet_lightning.controls.tokens.length_chunks`): less padding."""

NO_CONTROL = "none"
"""Name of the mode without any control (plain generation)."""


def word_count(prompt: Sequence[Message], response: str) -> float:
    """Words in ``response`` (:func:`~meet_lightning.stats.words`): the verbosity attribute."""
    return float(words(response))


DEFAULT_ATTRIBUTES: dict[str, Attribute] = {"words": word_count}


# --------------------------------------------------------------------------------------------- statistics
def is_proportion(name: str) -> bool:
    """Whether metric ``name`` is a share of items (each 0, 0.5 or 1): accuracies and the win rate."""
    return name.endswith("_accuracy") or name == "win_rate"


def summarize(name: str, values: Sequence[float], count: str = "pairs") -> dict[str, Any]:
    """``{name: mean, name_ci95: [lo, hi] or None, name_<count>: n}``.

    Proportions get a Wilson interval, other means a bootstrap one; below
    :data:`~meet_lightning.stats.MIN_ITEMS` items the interval is ``None`` (too few to say anything).
    """
    mean = sum(values) / len(values) if values else float("nan")
    interval = proportion_interval(values) if is_proportion(name) else mean_interval(values)
    return {name: mean, f"{name}_ci95": list(interval) if interval else None, f"{name}_{count}": len(values)}


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class EvalModel:
    """A model ready to be scored.

    Attributes:
        name: What the user passed (folder or alias).
        lm: The causal LM (eval mode).
        tokenizer: Its tokenizer.
        control: The control implementation (the no-op :class:`ControlTokens` for plain models).
        schema: Preferences and controls (empty for plain Hugging Face models).
        info: The export's ``meet_schema.json`` (empty for plain models).
    """

    name: str
    lm: nn.Module
    tokenizer: Any
    control: ControlTokens
    schema: ControlSchema
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_controls(self) -> bool:
        """Whether choosing a control changes the model's input (so the control classifier applies)."""
        return self.schema.num_controls > 0 and self.control.steers

    @property
    def is_dpo(self) -> bool:
        """Whether the export is a DPO model (its implicit reward needs the reference)."""
        return self.info.get("objective") == "dpo"

    @property
    def kind(self) -> str:
        """``dpo``, ``controls`` or ``plain``."""
        return "dpo" if self.is_dpo else "controls" if self.has_controls else "plain"

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device


def load_for_evaluation(name: str, device: str = "cpu", dtype: str = "auto") -> EvalModel:
    """An export folder (with its controls and schema), or any plain causal LM: folder, alias or hub id.

    ``dtype`` ``auto`` loads bfloat16 weights where ``device`` computes bf16 natively, else float32.
    """
    if (Path(name) / SCHEMA_FILE).is_file():
        model = AlignedModel.from_pretrained(name, dtype=dtype, device=device)
        info = json.loads((Path(name) / SCHEMA_FILE).read_text())
        return EvalModel(name, model.lm, model.tokenizer, model.control, model.schema, info)
    try:
        weights_dtype, _ = resolve_dtype(dtype, device)
    except ValueError as error:
        raise ConfigError(f"--dtype: {error}") from None
    lm = load_model(name, weights_dtype).to(device).eval()
    return EvalModel(name, lm, load_tokenizer(name), ControlTokens().to(device), ControlSchema({}))


def load_reference(model: EvalModel, override: str | None = None) -> nn.Module:
    """The reference of a DPO export: ``override``, else the base model its schema names; checked by fingerprint."""
    name = (
        override
        or schema_model_name(model, "reference_model", "--reference_model")
        or schema_model_name(model, "base_model", "--reference_model")
    )
    if not name:
        raise CheckpointError(f"{model.name}: the DPO export names no reference model — pass --reference_model DIR")
    reference = load_model(name).to(model.device).eval()  # float32: the fingerprint is of the weights as trained
    expected = model.info.get("base_fingerprint")
    if expected and model_fingerprint(reference) != expected:
        raise CheckpointError(
            f"reference {name} is not the model {model.name} was trained against (fingerprint ≠ {expected}) — pass --reference_model with that base model"
        )
    return reference.to(model.lm.dtype)


def schema_model_name(model: EvalModel, key: str, flag: str) -> str | None:
    """A model named by the export's ``meet_schema.json`` (``base_model``, ``reference_model``), if it is safe to open.

    The schema is a file from elsewhere: an alias or hub id is fine, but a filesystem path in it must stay inside
    the export folder; anything else is refused (the user can still pass that path explicitly with ``flag``).
    """
    name = model.info.get(key)
    if not name:
        return None
    if not isinstance(name, str):
        raise CheckpointError(f"{model.name}/meet_schema.json: {key} is not text — export the run again, or pass {flag}")
    path = Path(name).expanduser()
    path_like = path.is_absolute() or ".." in path.parts or name.startswith((".", "~")) or path.exists()
    if path_like and not path.resolve().is_relative_to(Path(model.name).resolve()):
        raise CheckpointError(
            f"{model.name}/meet_schema.json names {key} {name!r}, a path outside the export folder: not opened"
            f" — pass {flag} {name} yourself if you trust it"
        )
    return name


# ---------------------------------------------------------------------------------------- pairwise metrics
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


# ------------------------------------------------------------------------------------------- generation
def control_ids_for(model: EvalModel, control: str) -> list[int]:
    """Control ids of one mode (``none`` = no control)."""
    return resolve_controls(model.schema, None if control == NO_CONTROL else control)


def generate_under(model: EvalModel, prompts: Sequence[Sequence[Message]], control: str, options: DecodingOptions) -> list[str]:
    """Responses to ``prompts`` under one control (``none`` = plain), decoded as ``options``."""
    ids = [control_ids_for(model, control)] * len(prompts)
    return generate_responses(model.lm, model.tokenizer, model.control, list(prompts), ids, options)


@torch.no_grad()
def kl_to_base(
    model: EvalModel,
    base: nn.Module,
    prompts: Sequence[Sequence[Message]],
    responses: Sequence[str],
    control: str,
    max_length: int = 1024,
    batch_size: int = 8,
) -> float:
    """Monte-Carlo KL estimate ``E[log p_model(y|x, control) − log p_base(y|x)]`` per response token.

    ``responses`` are the model's own samples under ``control``; they are re-tokenized (with their end-of-turn
    token), so the estimate is over the tokens of the text as the tokenizer writes it.
    """
    encoder = PromptTokenizer(model.tokenizer, max_length)
    ids = control_ids_for(model, control)  # (P,) the same for every row
    rows = [
        encoder.tokenize(ControlledExample(tuple(p), r, {}), ControlSchema({})) for p, r in zip(prompts, responses, strict=True)
    ]
    rows = [r for r in rows if r is not None]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {
            k: v.to(model.device) for k, v in collate_rows(rows[start : start + batch_size], model.tokenizer.pad_token_id).items()
        }
        batch["control_ids"] = torch.tensor([ids], dtype=torch.long, device=model.device).expand(len(batch["input_ids"]), -1)
        own, mask = controlled_response_logps(model.lm, model.control, batch)  # (B, T+C-1): controls spliced in
        base_logps, base_mask = plain_logps(base.to(model.device), batch)  # (B, T-1): the same response tokens
        total += float((own * mask).sum() - (base_logps * base_mask).sum())
        count += int(mask.sum())
    return total / count if count else float("nan")


def control_fidelity(
    model: EvalModel,
    prompts: Sequence[Sequence[Message]],
    attributes: Mapping[str, Attribute] | None = None,
    controls: Sequence[str] | None = None,
    base: nn.Module | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Generates under every control with identical decoding and measures each attribute per control.

    Args:
        model: The model to probe.
        prompts: Chat prompts, the same for every control.
        attributes: ``{name: (prompt, response) → value}``; default word count (``words``).
        controls: Modes to generate under; default every control of the schema (``none`` for plain models).
        base: The base model for the KL estimate; ``None`` skips it.
        max_new_tokens: Longest response (identical for every control).
        temperature: 0 = greedy (identical for every control).
        batch_size: Prompts per generate call.

    Returns:
        ``{"controls", "attributes", "matrix": {control: {attribute: mean}}, "matrix_ci95", "values":
        {control: {attribute: [per prompt]}}, "kl_to_base": {control: nats per token}, "samples":
        {control: [responses]}, "prompts": n, "decoding": {...}}``.
    """
    attributes = dict(attributes or DEFAULT_ATTRIBUTES)
    controls = list(controls or (model.schema.names if model.has_controls else [NO_CONTROL]))
    result: dict[str, Any] = {
        "controls": controls,
        "attributes": list(attributes),
        "prompts": len(prompts),
        "decoding": {"max_new_tokens": max_new_tokens, "temperature": temperature},
        "matrix": {},
        "matrix_ci95": {},
        "values": {},
        "samples": {},
        "kl_to_base": {},
    }
    decoding = DecodingOptions(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    for control in controls:
        responses = generate_under(model, prompts, control, decoding)
        values = {name: [float(fn(p, r)) for p, r in zip(prompts, responses, strict=True)] for name, fn in attributes.items()}
        values.update(_batched_attributes(attributes, prompts, responses))
        result["samples"][control] = responses
        result["values"][control] = values
        result["matrix"][control] = {name: sum(v) / len(v) if v else float("nan") for name, v in values.items()}
        intervals = {name: mean_interval(v) for name, v in values.items()}  # None below MIN_ITEMS prompts
        result["matrix_ci95"][control] = {name: list(i) if i else None for name, i in intervals.items()}
        if base is not None:
            result["kl_to_base"][control] = kl_to_base(model, base, prompts, responses, control, batch_size=batch_size)
    return result


def _batched_attributes(attributes, prompts, responses) -> dict[str, list[float]]:
    # Reward models score a whole list at once (much faster than one call per response).
    return {name: fn.score(prompts, responses) for name, fn in attributes.items() if isinstance(fn, RewardModel)}


# -------------------------------------------------------------------------------------- reward and judges
class RewardModel:
    """Any Hugging Face sequence-classification model as a reward: ``(prompt, response) → float``.

    The conversation is rendered with the reward model's own chat template when it has one, else as
    ``role: content`` lines. The score is the single logit (``num_labels == 1``), else the logit of the last
    label. Long conversations are cut from the left, so the response is always seen.

    Args:
        path: Folder (or hub id) of the reward model and its tokenizer.
        device: Where to run it.
        batch_size: Responses per forward pass.
        max_length: Longest input in tokens.
    """

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 8, max_length: int = 1024) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise ConfigError(f"--reward_model {path}: folder not found — pass a folder with a sequence-classification model")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"--reward_model {path}: not a sequence-classification model ({first}) — pass another folder"
            ) from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        self.path, self.batch_size, self.max_length = path, batch_size, max_length

    @property
    def name(self) -> str:
        return f"reward_model:{self.path}"

    def render(self, prompt: Sequence[Message], response: str) -> str:
        """The text the reward model reads for one conversation."""
        messages = [*prompt, {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[float]:
        """One reward per ``(prompt, response)``."""
        texts = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.model.device)
            logits = self.model(**inputs).logits.float()  # (B, num_labels)
            out += logits[:, -1].tolist()
        return out

    def __call__(self, prompt: Sequence[Message], response: str) -> float:
        return self.score([prompt], [response])[0]


class RewardModelJudge:
    """A judge from a reward model: the response wins when its reward is higher (ties half)."""

    def __init__(self, reward: RewardModel) -> None:
        self.reward = reward

    @property
    def name(self) -> str:
        return self.reward.name

    def judge_all(self, prompts, responses, references) -> list[float]:
        """Win (1), tie (0.5) or loss (0) of each response against its reference."""
        ours, theirs = self.reward.score(prompts, responses), self.reward.score(prompts, references)
        return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)]


def import_callable(spec: str, flag: str) -> Callable:
    """``package.module:function`` → the function; ConfigError naming ``flag`` otherwise."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{flag} {spec!r} is not module:function — e.g. {flag} my_judges:length_judge")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{flag} {spec}: cannot import ({error}) — check the module is on PYTHONPATH and the name") from None
    if not callable(fn):
        raise ConfigError(f"{flag} {spec} is not callable — point it at a function")
    return fn


def load_judge(spec: str | Judge, device: str = "cpu") -> tuple[str, Callable]:
    """A judge from a reward-model folder, a ``module:function`` spec or a callable; and its name.

    Returns:
        ``(name, judge_all)`` where ``judge_all(prompts, responses, references)`` gives one score per prompt.
    """
    if callable(spec):
        fn = spec
        return f"callable:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}", _judge_each(fn)
    if Path(spec).is_dir():
        judge = RewardModelJudge(RewardModel(spec, device))
        return judge.name, judge.judge_all
    return f"callable:{spec}", _judge_each(import_callable(spec, "--judge"))


def _judge_each(fn: Judge) -> Callable:
    def judge_all(prompts, responses, references) -> list[float]:
        return [float(fn(p, r, ref)) for p, r, ref in zip(prompts, responses, references, strict=True)]

    return judge_all


def win_rate(judge: str | Judge, prompts, responses, references, device: str = "cpu") -> dict[str, Any]:
    """``win_rate`` of ``responses`` over ``references`` under ``judge``, with interval and count."""
    name, judge_all = load_judge(judge, device)
    return {**summarize("win_rate", judge_all(prompts, responses, references), count="prompts"), "judge": name}


# -------------------------------------------------------------------------------------------- prompts
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
