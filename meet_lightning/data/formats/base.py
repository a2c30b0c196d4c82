"""What every format builds on: the options a source is read with (:class:`SourceConfig`), the base class of a
format (:class:`DataFormat`) and the registry of format names (:data:`FORMATS`, :func:`register_format`,
:func:`get_format`).

One module because each of the three needs the others: a :class:`SourceConfig` checks its ``format`` against the
registry when it is built, the registry holds :class:`DataFormat` subclasses, and a :class:`DataFormat` is built
from a :class:`SourceConfig`. The library's own formats live in the modules of their kind (``pairs``, ``scores``,
``feedback``, ``ranked``) and are registered in :mod:`~meet_lightning.data.formats.detection`.
"""

from __future__ import annotations

import abc
import difflib
import importlib
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from meet_lightning.data.formats.reading import HubOptions
from meet_lightning.data.formats.records import BadRow, ParsedRecord, _field_label, _kind, _messages, _Missing, _text
from meet_lightning.data.rows import PreferencePair
from meet_lightning.errors import ConfigError

DEFAULT_PREFERENCE = "preference"
"""Preference name used when a source sets none."""

PAIRINGS = ("all_pairs", "best_vs_rest")
TIES = ("skip", "tie")
BAD_ROW_POLICIES = ("error", "skip")
TIE_CONTROL = "tie"
"""Control both responses of a tied ``pairwise_votes`` comparison train under with ``ties: tie``."""

_DEFAULT_LABELS: dict[int, tuple[str, ...]] = {2: ("bad", "good"), 3: ("low", "mid", "high")}


def default_score_labels(bins: int) -> list[str]:
    """Labels for ``bins`` score bins, lowest first.

    ``bad, good`` for 2 (the controls pairwise data uses, so pointwise and pairwise sources can feed one
    preference), ``low, mid, high`` for 3, else ``bin1 … binN``.
    """
    return list(_DEFAULT_LABELS.get(bins, [f"bin{i + 1}" for i in range(bins)]))


# --------------------------------------------------------------------------------------------------- config


@dataclass
class SourceConfig:
    """One data source and how to turn its records into training rows.

    Attributes:
        path: A local ``.json`` / ``.jsonl`` / ``.csv`` file (optionally ``.gz``), a ``.parquet`` file, or a
            hub dataset id ``owner/name``.
        format: ``auto`` (detected from the first record's keys) or one of ``hh_rlhf``, ``pairwise``,
            ``sharegpt``, ``multi_response``, ``pointwise``, ``pairwise_votes``, ``ranked``, ``unpaired``,
            ``messages_feedback``, a format registered with :func:`register_format`, or the class path of a
            :class:`DataFormat` subclass of your own (``my_package.formats.MyFormat``, imported).
        preference: Preference the labels belong to; ``None`` means ``preference``. For pointwise
            ``scores`` dicts each attribute is its own preference, named after the attribute
            (``overall``), or ``<preference>_<attribute>`` when this is set (``usr_overall``).
        columns: ``{canonical field: column in the file}``, e.g. ``{prompt: instruction, chosen: better}``.
        prompt_template: Builds the prompt from several columns, e.g. ``"{context}\\n\\n{source}"``
            (formats with a prompt column: pairwise, multi_response, pointwise, pairwise_votes).
        system_prompt: A system turn put before every prompt that has none.
        chosen_control: Control the preferred response trains under.
        rejected_control: Control the other response trains under.
        controls: ``multi_response``: the columns that each hold one control's response (default: every
            string column of the first record except the prompt columns).
        score_thresholds: ``pointwise`` and ``messages_feedback`` scores: ascending cut points; ``score < t0`` gets the first label,
            ``t0 <= score < t1`` the second, and so on.
        score_labels: ``pointwise`` labels, lowest first, one more than the thresholds (or one per quantile
            bin). Default: ``bad, good`` for two bins, ``low, mid, high`` for three, else ``bin1 … binN``.
        quantile_bins: ``pointwise``: near-equal-count bins computed over the whole file, per attribute.
            With neither thresholds nor bins, a median split (``quantile_bins: 2``, labels ``bad, good``).
        attributes: ``pointwise`` ``scores`` dicts: the attributes to use (default: all).
        pairing: ``ranked``: ``all_pairs`` (every two ranked siblings) or ``best_vs_rest`` (the best-ranked
            reply against each other ranked sibling).
        ties: ``pairwise_votes``: ``skip`` (counted) or ``tie`` (both responses train under control ``tie``).
        subset: Hub datasets and dataset folders only: the configuration name (``load_dataset``'s ``name``).
        data_dir: Hub datasets and dataset folders only: the folder of the repository to read, e.g.
            ``harmless-base`` of ``Anthropic/hh-rlhf``.
        split: Hub datasets and dataset folders only: the split to read.
        revision: Hub datasets only: a branch, tag or commit, so a run reads the same data again.
        on_bad_rows: ``error`` stops at the first bad record; ``skip`` skips it and counts it by reason.
    """

    path: str
    format: str = "auto"
    preference: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    system_prompt: str | None = None
    chosen_control: str = "good"
    rejected_control: str = "bad"
    controls: list[str] | None = None
    score_thresholds: list[float] | None = None
    score_labels: list[str] | None = None
    quantile_bins: int | None = None
    attributes: list[str] | None = None
    pairing: str = "all_pairs"
    ties: str = "skip"
    subset: str | None = None
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None
    on_bad_rows: str = "error"

    @property
    def hub(self) -> HubOptions:
        """The options ``datasets.load_dataset`` takes for a hub id or a dataset folder."""
        return HubOptions(self.subset, self.data_dir, self.split, self.revision)

    def __post_init__(self) -> None:
        problems = [problem for check in _CONFIG_CHECKS for problem in check(self)]
        if problems:
            raise ConfigError(f"data source {self.path!r}: " + "; ".join(problems))


def _check_choices(cfg: SourceConfig) -> list[str]:
    choices = {
        "pairing": PAIRINGS,
        "ties": TIES,
        "on_bad_rows": BAD_ROW_POLICIES,
    }
    problems = []
    if cfg.format != "auto":
        try:
            get_format(cfg.format)
        except ConfigError as err:
            problems.append(str(err))
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fix = f"set --data.{name} to one of {', '.join(allowed)}"
            problems.append(f"{name} {value!r} is unknown{hint} — {fix}")
    return problems


def _check_names(cfg: SourceConfig) -> list[str]:
    problems = []
    if not isinstance(cfg.path, str) or not cfg.path.strip():
        problems.append("path is empty — set --data.path FILE")
    if cfg.chosen_control == cfg.rejected_control:
        problems.append(f"chosen_control and rejected_control are both {cfg.chosen_control!r} — give them different names")
    if not isinstance(cfg.columns, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in cfg.columns.items()
    ):
        problems.append("columns must map field names to column names — e.g. --data.columns '{prompt: q}'")
    if cfg.controls is not None and (not cfg.controls or len(set(cfg.controls)) != len(cfg.controls)):
        problems.append("controls must name distinct columns — e.g. --data.controls '[concise, verbose]'")
    return problems


def _check_template(cfg: SourceConfig) -> list[str]:
    if cfg.prompt_template is None:
        return []
    fix = "write columns as {name}, e.g. --data.prompt_template '{context}\\n\\n{source}'"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(cfg.prompt_template) if name is not None]
    except ValueError as err:
        return [f"prompt_template is not a valid template ({err}) — {fix}"]
    if not names:
        return [f"prompt_template names no column — {fix}"]
    if not all(name.isidentifier() for name in names):
        return [f"prompt_template fields must be plain column names, got {names} — {fix}"]
    parser = FORMATS.get(cfg.format)  # an unknown one is _check_choices' problem
    if parser is not None and not parser.uses_template:
        return [_no_template(cfg.format)]
    return []


def _no_template(name: str) -> str:
    return (
        f"prompt_template does not apply to format {name} (its prompt comes from the conversation) — "
        "remove --data.prompt_template"
    )


def _check_scores(cfg: SourceConfig) -> list[str]:
    problems = []
    thresholds, bins, labels = cfg.score_thresholds, cfg.quantile_bins, cfg.score_labels
    if thresholds is not None and bins is not None:
        problems.append("score_thresholds and quantile_bins are both set — keep one of them")
    if thresholds is not None:
        if not thresholds or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in thresholds):
            problems.append("score_thresholds must be finite numbers — e.g. --data.score_thresholds '[3.0]'")
        elif any(a >= b for a, b in zip(thresholds, thresholds[1:], strict=False)):
            problems.append(f"score_thresholds {thresholds} are not ascending — list the cut points, lowest first")
    if bins is not None and (not isinstance(bins, int) or bins < 2):
        problems.append(f"quantile_bins {bins!r} must be an integer >= 2 — e.g. --data.quantile_bins 2")
    if labels is not None:
        expected = len(thresholds) + 1 if thresholds else bins if isinstance(bins, int) else 2
        if len(labels) != expected or len(set(labels)) != len(labels):
            problems.append(f"score_labels needs {expected} distinct labels, got {labels} — give one label per bin, lowest first")
    return problems


_CONFIG_CHECKS: tuple[Callable[[SourceConfig], list[str]], ...] = (
    _check_choices,
    _check_names,
    _check_template,
    _check_scores,
)


# ------------------------------------------------------------------------------------------------ formats


class DataFormat(abc.ABC):
    """Base class of every data format: turns one raw record into pairs and training rows.

    Add a format of your own by subclassing it and registering it under a name (no edit of this module)::

        from meet_lightning import DataFormat, ParsedRecord, register_format

        class QuestionAnswers(DataFormat):
            # reads {"question": ..., "good_answer": ..., "bad_answer": ...}

            summary = "question, good_answer, bad_answer"

            @classmethod
            def detect(cls, record):
                return "good_answer" in record and "bad_answer" in record

            def parse(self, rec, raw, source):
                prompt = self._finish_prompt([{"role": "user", "content": self._string(rec, "question")}])
                out = ParsedRecord()
                out.add_pair(self._pair(prompt, self._string(rec, "good_answer"), self._string(rec, "bad_answer"), source))
                return out

        register_format("question_answers", QuestionAnswers)

    A recipe then sets ``data.format: question_answers`` once the module is imported, or names the class
    itself, ``data.format: my_package.formats.QuestionAnswers``, which imports it (``fit`` on the command line
    imports nothing else of yours).

    Override:
        parse: Required. ``(rec, raw, source) -> ParsedRecord`` for one record: ``rec`` has ``columns``
            applied, ``raw`` is the record as read (for ``prompt_template``), ``source`` is ``FILE:ROW``.
            Raise :class:`BadRow` for an unusable record (it stops the read, or with ``on_bad_rows: skip`` is
            counted under its reason); append to ``ParsedRecord.skipped`` for a record that is fine but
            gives nothing (counted with its row, never dropped silently).
        finish: Optional. Runs after the last record and returns a :class:`ParsedRecord` of what needs the
            whole file (pointwise quantiles, pairing replies across rows).
        detect: Optional classmethod ``(record) -> bool``: whether ``auto`` should pick this format for a
            file whose first record (columns applied) is ``record``. The default claims nothing.
        summary: The keys the format reads, shown when no format fits a file.
        uses_template: ``True`` when the prompt comes from a column, so ``prompt_template`` applies.

    Helpers for subclasses: ``_require(rec, *fields)`` (missing fields are a bad row naming the user's column),
    ``_string``, ``_prompt`` (a prompt column or ``prompt_template``), ``_reply_turns``, ``_finish_prompt``
    (checks the prompt, adds ``system_prompt``) and ``_pair`` (a :class:`PreferencePair` under
    ``chosen_control`` / ``rejected_control``). ``self.cfg`` is the :class:`SourceConfig`, ``self.preference``
    the preference name.

    A fresh instance reads each source, so a format may keep state across records (pointwise buffers its
    scores to compute quantiles; ranked notes whether any rank was seen). The tokenized cache is keyed by the
    format's name and the file, not the format's code: after changing a format of your own, pass another
    ``cache_dir`` or delete the cache folder.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # the keys this format reads, for the "cannot tell the format" message
    uses_template: ClassVar[bool] = False

    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        """Whether ``auto`` should read a file whose first record is ``record`` with this format (default: never)."""
        return False

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.preference = cfg.preference or DEFAULT_PREFERENCE

    @abc.abstractmethod
    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        """Turn one record into pairs and examples.

        Args:
            rec: The record with ``columns`` applied (canonical field names).
            raw: The record as read, for ``prompt_template``.
            source: ``FILE:ROW`` for the examples.
        """

    def finish(self) -> ParsedRecord:
        """Whatever needs the whole file (e.g. quantile labels)."""
        return ParsedRecord()

    # Field access: missing and mistyped fields are bad rows naming the column as the user wrote it.
    def _require(self, rec: Mapping[str, Any], *names: str) -> None:
        missing = [name for name in names if name not in rec]
        if missing:
            raise _Missing(missing, self.cfg.columns)

    def _string(self, rec: Mapping[str, Any], name: str) -> str:
        self._require(rec, name)
        value = rec[name]
        if not isinstance(value, str):
            raise self._wrong_type(name, value, "a string")
        return value

    def _response_cell(self, rec: Mapping[str, Any], name: str, out: ParsedRecord) -> str:
        self._require(rec, name)
        text = _text(rec[name], name, out)
        if text is None:
            raise self._wrong_type(name, rec[name], "a string")
        return text

    def _wrong_type(self, name: str, value: Any, expected: str) -> BadRow:
        label = _field_label(name, self.cfg.columns)
        fix = f"fix the value or map another column with --data.columns '{{{name}: COLUMN}}'"
        return BadRow(f"field {label} is {_kind(value)}, expected {expected}", fix, "type")

    def _prompt(self, rec: Mapping[str, Any], raw: Mapping[str, Any], name: str = "prompt") -> list[dict]:
        """The prompt turns: from ``prompt_template``, or a string or message list in column ``name``."""
        if self.cfg.prompt_template is not None:
            return [{"role": "user", "content": self._render(raw)}]
        self._require(rec, name)
        value = rec[name]
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if isinstance(value, list):
            return _messages(value, f"field {name!r}")
        raise self._wrong_type(name, value, "a string or a list of messages")

    def _render(self, raw: Mapping[str, Any]) -> str:
        template = self.cfg.prompt_template or ""
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        missing = [name for name in names if name not in raw]
        if missing:
            fix = "fix --data.prompt_template or the file's columns"
            raise BadRow(f"missing column {missing[0]!r} named in prompt_template", fix, "missing")
        for name in names:
            if not isinstance(raw[name], (str, int, float)) or isinstance(raw[name], bool):
                raise self._wrong_type(name, raw[name], "a string (prompt_template column)")
        try:
            return template.format(**{name: raw[name] for name in names})
        except (ValueError, TypeError) as err:  # a format spec such as {x:.2f} applied to text
            raise BadRow(f"prompt_template cannot format this row ({err})", "drop the format spec") from None

    def _finish_prompt(self, turns: Sequence[Mapping[str, str]]) -> tuple[dict, ...]:
        """Check the prompt says something, then put ``system_prompt`` first unless it has a system turn."""
        if not any(t["content"].strip() for t in turns if t["role"] != "system"):
            raise BadRow("empty prompt", "fill in the prompt or drop the row (--data.on_bad_rows skip)")
        turns = [dict(t) for t in turns]
        if self.cfg.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return tuple(turns)

    def _reply_turns(self, rec: Mapping[str, Any], name: str, out: ParsedRecord) -> tuple[list[dict[str, str]], str]:
        """``(turns before the response, response text)`` of a response column (``chosen``, ``completion``…).

        A string is the response; a message list ends with it, and its earlier turns continue the prompt.
        """
        value = rec[name]
        text = _text(value, name, out)
        if text is not None:
            return [], text
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self._wrong_type(name, value, "a string or a non-empty list of messages")
        turns = _messages(value, f"field {name!r}")
        if turns[-1]["role"] != "assistant":
            raise BadRow(
                f"the last message of {name} is a {turns[-1]['role']} turn",
                f"end {name} with the assistant response",
                "type",
            )
        return turns[:-1], turns[-1]["content"]

    def _pair(self, prompt: tuple, chosen: str, rejected: str, source: str) -> PreferencePair:
        cfg = self.cfg
        return PreferencePair(prompt, chosen, rejected, self.preference, cfg.chosen_control, cfg.rejected_control, source)


# ----------------------------------------------------------------------------------------------- registry

FORMATS: dict[str, type[DataFormat]] = {}
"""Format name → parser class, every registered format (:func:`register_format`); :func:`read_source` builds
a fresh parser per source."""

_DETECTORS: list[tuple[str, Callable[[Mapping[str, Any]], bool]]] = []
"""``(name, detector)`` in the order ``auto`` tries them: the first that fits wins."""

_FORMAT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def register_format(
    name: str,
    format_class: type[DataFormat],
    detector: Callable[[Mapping[str, Any]], bool] | None = None,
    *,
    detect_first: bool = True,
    replace: bool = False,
) -> type[DataFormat]:
    """Makes ``format_class`` readable as ``--data.format NAME`` (and by ``auto`` when it has a detector).

    The library's own formats are registered with this function too, at the end of
    :mod:`meet_lightning.data.formats.detection`. Example::

        register_format("question_answers", QuestionAnswers)   # see DataFormat's example

    Args:
        name: What ``--data.format`` / ``data.format`` takes: letters, digits and ``_``, not ``auto``.
        format_class: A subclass of :class:`DataFormat`.
        detector: ``(record) -> bool``, whether ``auto`` should read a file whose first record (columns
            applied) is ``record`` with this format; default the class's own :meth:`DataFormat.detect`.
        detect_first: Try this detector before the formats registered earlier (the default: a format you add
            is more specific than the library's general ones, e.g. ``multi_response`` takes any record with a
            ``prompt`` and two text columns); ``False`` tries it after them.
        replace: Allow replacing a registered format of the same name (else a ``ValueError``).

    Returns:
        ``format_class``, so the function also works as a decorator's body.

    Raises:
        TypeError: ``format_class`` is not a :class:`DataFormat` subclass, or ``detector`` is not callable.
        ValueError: A bad name, or a name taken by another class without ``replace``.
    """
    if not (isinstance(format_class, type) and issubclass(format_class, DataFormat)):
        raise TypeError(f"register_format({name!r}, ...): {format_class!r} is not a subclass of meet_lightning.DataFormat")
    if not isinstance(name, str) or not _FORMAT_NAME.fullmatch(name) or name == "auto":
        raise ValueError(f"register_format: format name {name!r} must be letters, digits and _ (and not 'auto')")
    if detector is not None and not callable(detector):
        raise TypeError(f"register_format({name!r}, ...): detector {detector!r} is not callable")
    _add_format(name, format_class, detector or format_class.detect, detect_first, replace)
    return format_class


def _add_format(name: str, format_class: type[DataFormat], detector: Callable, detect_first: bool, replace: bool) -> None:
    existing = FORMATS.get(name)
    if existing is not None and not replace and _class_path(existing) != _class_path(format_class):
        raise ValueError(
            f"data format {name!r} is already registered ({_class_path(existing)}) — pick another name, or pass"
            " replace=True to replace it"
        )
    unregister_format(name)  # re-registering (a module imported again) replaces, never duplicates
    FORMATS[name] = format_class
    _DETECTORS.insert(0 if detect_first else len(_DETECTORS), (name, detector))


def unregister_format(name: str) -> None:
    """Removes a registered format (and its detector); a name that is not registered is ignored."""
    FORMATS.pop(name, None)
    _DETECTORS[:] = [(n, fits) for n, fits in _DETECTORS if n != name]


def format_names() -> list[str]:
    """The names ``--data.format`` takes besides ``auto`` and a class path: every registered format."""
    return list(FORMATS)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_format(name: str) -> type[DataFormat]:
    """The parser class of ``--data.format NAME``: a registered name, or a class path ``package.module.Class`` of
    a :class:`DataFormat` subclass (its module is imported: a recipe names it, as it names a control class).

    Raises:
        ConfigError: Unknown name, a class path that does not import, or a class that is not a DataFormat.
    """
    found = FORMATS.get(name)
    if found is not None:
        return found
    module_name, _, class_name = name.replace(":", ".").rpartition(".") if isinstance(name, str) else ("", "", "")
    if not module_name:
        close = difflib.get_close_matches(str(name), list(FORMATS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"format {name!r} is unknown{hint} — set --data.format to auto, one of {', '.join(FORMATS)}, or the class"
            " path of a format of your own (my_package.formats.MyFormat)"
        )
    try:
        found = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError as err:
        raise ConfigError(
            f"format {name!r}: cannot import {module_name!r} ({err}) — check the class path and that the package is installed"
        ) from None
    if not (isinstance(found, type) and issubclass(found, DataFormat)):
        raise ConfigError(
            f"format {name!r} is not a subclass of meet_lightning.DataFormat — name a DataFormat subclass or a registered format"
        )
    _add_format(name, found, found.detect, detect_first=True, replace=True)
    return found
