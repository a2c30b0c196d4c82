"""Pointwise scores (``pointwise``): responses with a score, or one per attribute, binned into controls over the
whole file. The binning (:func:`score_cuts`, :func:`score_labels`, :func:`quantile_cuts`) is shared with
``messages_feedback``'s scores.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from meet_lightning.data.formats.base import DataFormat, SourceConfig, default_score_labels
from meet_lightning.data.formats.records import ParsedRecord, _Missing, _number, _one_line, _response, _short
from meet_lightning.data.rows import ControlledExample
from meet_lightning.errors import DataError


class Pointwise(DataFormat):
    """``prompt`` / ``response`` + ``score`` (a number) or ``scores`` (``{attribute: number}``).

    A single ``score`` labels ``preference``; with ``scores`` each attribute is its own preference (named
    after the attribute, or ``<preference>_<attribute>`` when ``preference`` is set) and one row carries a
    control for every attribute it has a score for (a null score gives no control). Labels come from
    ``score_thresholds`` or from ``quantile_bins`` computed over the whole file per preference; with
    neither, a median split (2 quantile bins) labelled ``bad`` / ``good``.
    """

    name = "pointwise"
    summary = "prompt, response, score or scores"
    uses_template = True

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.rows: list[tuple[tuple, str, dict[str, float], str]] = []
        self.attributes_seen: set[str] = set()

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, *([] if self.cfg.prompt_template else ["prompt"]), "response")
        if "score" not in rec and "scores" not in rec:
            raise _Missing(["score"], self.cfg.columns, note=" (or 'scores')")
        prompt = self._finish_prompt(self._prompt(rec, raw))
        out = ParsedRecord()
        response = _response(self._response_cell(rec, "response", out), "response")
        scores = self._scores(rec)
        if not scores:
            out.skipped.append("no score for the selected attributes")
            return out
        self.rows.append((prompt, response, scores, source))
        return out

    def _scores(self, rec: Mapping[str, Any]) -> dict[str, float]:
        if "scores" not in rec:
            return {self.preference: _number(rec["score"], "field 'score'")}
        table = rec["scores"]
        if not isinstance(table, Mapping):
            raise self._wrong_type("scores", table, "an object {attribute: number}")
        self.attributes_seen.update(str(name) for name in table)
        wanted = self.cfg.attributes
        prefix = f"{self.cfg.preference}_" if self.cfg.preference else ""
        return {
            f"{prefix}{name}": _number(value, f"scores[{name!r}]")
            for name, value in table.items()
            if value is not None and (wanted is None or name in wanted)
        }

    def finish(self) -> ParsedRecord:
        self._check_attributes()
        values: dict[str, list[float]] = {}
        for _, _, scores, _ in self.rows:
            for preference, value in scores.items():
                values.setdefault(preference, []).append(value)
        cuts = {pref: self._cuts(vals) for pref, vals in values.items()}
        labels = self._labels()
        out = ParsedRecord()
        for prompt, response, scores, source in self.rows:
            controls = {p: labels[bisect.bisect_right(cuts[p], v)] for p, v in scores.items()}
            out.examples.append(ControlledExample(prompt, response, controls, source))
        return out

    def _cuts(self, values: list[float]) -> list[float]:
        return score_cuts(self.cfg, values)

    def _labels(self) -> list[str]:
        return score_labels(self.cfg)

    def _check_attributes(self) -> None:
        unknown = [name for name in self.cfg.attributes or [] if name not in self.attributes_seen]
        if unknown and self.attributes_seen:
            found = ", ".join(_short(name, 30) for name in sorted(self.attributes_seen))
            raise DataError(
                _one_line(
                    f"{self.cfg.path}: attribute {unknown[0]!r} is in no row's scores — set --data.attributes to some of {found}"
                )
            )


def score_cuts(cfg: SourceConfig, values: Sequence[float]) -> list[float]:
    """Cut points of the score bins of a source: ``score_thresholds``, else ``quantile_bins`` (default 2) over
    ``values``; a score gets ``score_labels(cfg)[bisect_right(cuts, score)]``."""
    if cfg.score_thresholds is not None:
        return [float(t) for t in cfg.score_thresholds]
    return quantile_cuts(values, cfg.quantile_bins or 2)


def score_labels(cfg: SourceConfig) -> list[str]:
    """The control of each score bin, lowest first: ``score_labels``, else :func:`default_score_labels`."""
    bins = len(cfg.score_thresholds) + 1 if cfg.score_thresholds else cfg.quantile_bins or 2
    return list(cfg.score_labels) if cfg.score_labels else default_score_labels(bins)


def quantile_cuts(values: Sequence[float], bins: int) -> list[float]:
    """Cut points for ``bins`` near-equal-count bins over ``values`` (``score < cut`` falls below a cut).

    Equal scores always share a bin, so each cut is the distinct value whose count of smaller scores is
    closest to ``k * n / bins``; on coarse scales a bin can come out larger or empty.
    """
    ordered = sorted(values)
    candidates = [(value, bisect.bisect_left(ordered, value)) for value in sorted(set(ordered))[1:]]
    if not candidates:
        return []
    cuts = []
    for k in range(1, bins):
        target = k * len(ordered) / bins
        cuts.append(min(candidates, key=lambda c: (abs(c[1] - target), c[1]))[0])
    return cuts
