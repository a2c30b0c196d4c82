"""Feedback on single responses: a true / false label per completion (``unpaired``), and chat logs with thumbs
or scores on assistant turns (``messages_feedback``), whose replies to one prompt are paired across rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any

from meet_lightning.data.formats.base import DataFormat, SourceConfig
from meet_lightning.data.formats.records import (
    BadRow,
    ParsedRecord,
    _field_label,
    _message,
    _number,
    _response,
    _short,
)
from meet_lightning.data.formats.scores import score_cuts, score_labels
from meet_lightning.data.rows import ControlledExample, PreferencePair
from meet_lightning.errors import DataError


class Unpaired(DataFormat):
    """Unpaired labelled responses (TRL's unpaired preference, as KTO trains on): ``prompt`` / ``completion`` / ``label``.

    ``label`` true marks a desirable completion (control ``chosen_control``, ``good``), false an undesirable
    one (``rejected_control``, ``bad``): a JSON boolean, or in CSV cells ``true`` / ``false`` / ``1`` / ``0``.
    ``prompt`` is a string or a message list; ``completion`` a string or a message list ending with the
    assistant turn (its earlier turns continue the prompt). Rows only, no pairs: validation scores their loss,
    not the control classifier.
    """

    name = "unpaired"
    summary = "prompt, completion, label (true/false)"
    uses_template = True
    _LABELS = {"true": True, "1": True, "false": False, "0": False}

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, *([] if self.cfg.prompt_template else ["prompt"]), "completion", "label")
        out = ParsedRecord()
        head, completion = self._reply_turns(rec, "completion", out)
        prompt = self._finish_prompt(self._prompt(rec, raw) + head)
        completion = _response(completion, "completion")
        control = self.cfg.chosen_control if self._label(rec["label"]) else self.cfg.rejected_control
        out.examples.append(ControlledExample(prompt, completion, {self.preference: control}, source))
        return out

    def _label(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        key = value.strip().lower() if isinstance(value, str) else value if isinstance(value, int) else None
        found = self._LABELS.get(str(key)) if key is not None else None
        if found is None:
            label = _field_label("label", self.cfg.columns)
            raise BadRow(
                f"field {label} is {_short(value)}, expected true or false", "write true (desirable) or false (undesirable)"
            )
        return found


@dataclass(frozen=True)
class _Reply:
    """One assistant reply with feedback, kept until the whole file is read (pairs can span rows)."""

    prompt: tuple[dict[str, str], ...]
    response: str
    kind: str  # "thumb" (value ±1) or "number"
    value: float
    source: str


_THUMBS = {
    **dict.fromkeys(("up", "thumbs_up", "thumbsup", "thumb_up", "good", "positive", "like", "liked", "+1", "👍"), 1.0),
    **dict.fromkeys(("down", "thumbs_down", "thumbsdown", "thumb_down", "bad", "negative", "dislike", "disliked", "👎"), -1.0),
}
_FEEDBACK_KEYS = ("feedback", "rating", "score")
_NO_FEEDBACK = "no feedback on any assistant turn"
_NEUTRAL = "neutral feedback (0 in a file of -1/0/1)"


class MessagesFeedback(DataFormat):
    """Chat logs in the OpenAI ``messages`` shape with feedback on assistant replies (thumbs or scores).

    A sample row (one JSON object per line)::

        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Name a prime number."},
                      {"role": "assistant", "content": "7", "feedback": "up"}]}

    Feedback sits on an assistant turn (key ``feedback``, ``rating`` or ``score``), or on the row under the
    same keys, where it belongs to the last assistant turn (``{"messages": [...], "rating": 4}``). Every
    assistant turn with feedback is one reply to the turns before it (its prompt).

    Values, decided once per file:

    * **Thumbs**: ``"up"`` / ``"down"`` (also ``thumbs_up`` / ``thumbs_down``, ``good`` / ``bad``,
      ``positive`` / ``negative``, ``like`` / ``dislike``, 👍 / 👎), JSON ``true`` / ``false``, and numbers
      when every number of the file is -1, 0 or 1: 1 is up, -1 down, 0 neutral (skipped and counted); in a
      file of only 0 and 1, 0 is down. Two different replies to the same prompt (the same turns before them,
      also across rows: a regenerated answer is often logged as a row of its own) with opposite thumbs form
      a pair, thumbs up chosen. Every reply is one training row under ``chosen_control`` (up, ``good``) or
      ``rejected_control`` (down, ``bad``), paired or not.
    * **Scores**: any other numbers (a 1-5 rating, a reward): binned as ``pointwise`` bins them
      (``score_thresholds``, or ``quantile_bins`` over the file, by default a median split into ``bad`` /
      ``good``; ``score_labels`` names the bins). Replies to the same prompt in different bins form a pair,
      the higher bin chosen, each side under its bin's label. Setting ``score_thresholds`` or
      ``quantile_bins`` reads every value as a score.

    A row with no feedback at all is skipped and counted (``no feedback on any assistant turn``); feedback
    that is neither a thumb nor a number, or on a row without an assistant turn, is a bad row. Message
    ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts.
    """

    name = "messages_feedback"
    summary = "messages with feedback/rating/score on assistant turns"
    _VALUES_FIX = "use up/down (or true/false, 1/-1) for thumbs, or a number for a score"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.replies: list[_Reply] = []

    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        """A ``messages`` list (feedback may be missing from the first rows: they are counted, not guessed)."""
        return isinstance(record.get("messages"), list)

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "messages")
        value = rec["messages"]
        if not isinstance(value, list):
            raise self._wrong_type("messages", value, "a list of messages")
        turns, feedback = [], []
        for i, item in enumerate(value):
            turns.append(_message(_text_parts(item), f"field 'messages'[{i}]"))
            given = _first_feedback(item) if isinstance(item, Mapping) else None
            if given is not None:
                if turns[-1]["role"] != "assistant":
                    raise BadRow(f"messages[{i}] is a {turns[-1]['role']} turn with feedback", "put feedback on assistant turns")
                feedback.append((i, self._value(given, f"messages[{i}].feedback")))
        self._row_feedback(rec, turns, feedback)
        out = ParsedRecord()
        if not feedback:
            out.skipped.append(_NO_FEEDBACK)
            return out
        for i, (kind, number) in feedback:
            prompt = self._finish_prompt(turns[:i])
            response = _response(turns[i]["content"], f"assistant reply messages[{i}] (it has feedback)")
            self.replies.append(_Reply(prompt, response, kind, number, source))
        return out

    def _row_feedback(self, rec: Mapping[str, Any], turns: list[dict], feedback: list) -> None:
        """Adds the row's own ``feedback`` / ``rating`` / ``score`` to its last assistant turn."""
        given = _first_feedback(rec)
        if given is None:
            return
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None:
            raise BadRow("the row has feedback but no assistant turn", "end messages with the assistant reply it rates")
        value = self._value(given, "the row's feedback")
        own = dict(feedback).get(last)
        if own is None:
            feedback.append((last, value))
        elif own != value:
            raise BadRow("the row's feedback and its last assistant turn's feedback disagree", "keep one of them")

    def _value(self, given: Any, where: str) -> tuple[str, float]:
        if isinstance(given, bool):
            return "thumb", 1.0 if given else -1.0
        if isinstance(given, str) and given.strip().lower() in _THUMBS:
            return "thumb", _THUMBS[given.strip().lower()]
        try:
            return "number", _number(given, where)
        except BadRow:
            raise BadRow(f"{where} is {_short(given)}", self._VALUES_FIX) from None

    def finish(self) -> ParsedRecord:
        out = ParsedRecord()
        if not self.replies:
            return out
        numbers = {r.value for r in self.replies if r.kind == "number"}
        forced = self.cfg.score_thresholds is not None or self.cfg.quantile_bins is not None
        thumbs = [r for r in self.replies if r.kind == "thumb"]
        if not forced and numbers <= {-1.0, 0.0, 1.0}:
            if numbers == {0.0, 1.0}:  # a file of 0 and 1 (a label column): 0 is thumbs down, not neutral
                self.replies = [replace(r, value=-1.0) if r.value == 0 else r for r in self.replies]
            self._thumbs(out, self.replies)
        elif thumbs:
            scores = ", ".join(f"{n:g}" for n in sorted(numbers)[:3])
            why = "score_thresholds / quantile_bins read feedback as scores" if forced else f"other rows give scores ({scores}…)"
            raise DataError(
                f"{thumbs[0].source}: feedback {'up' if thumbs[0].value > 0 else 'down'} is a thumb, but {why} — "
                "give one kind of feedback per file (split it into two sources)"
            )
        else:
            self._scores(out)
        return out

    def _thumbs(self, out: ParsedRecord, replies: list[_Reply]) -> None:
        cfg = self.cfg
        for prompt, group in _by_prompt(replies):
            rated = [r for r in group if r.value != 0]
            out.skipped.extend(_NEUTRAL for r in group if r.value == 0)
            ups = _distinct(r for r in rated if r.value > 0)
            downs = _distinct(r for r in rated if r.value < 0)
            for up in ups:
                for down in downs:
                    if up.response.strip() == down.response.strip():
                        out.warnings.append("the same reply got thumbs up and down (not compared)")
                        continue
                    pair = PreferencePair(
                        prompt, up.response, down.response, self.preference, cfg.chosen_control, cfg.rejected_control, up.source
                    )
                    out.pairs.append(pair)
            for r in rated:
                control = cfg.chosen_control if r.value > 0 else cfg.rejected_control
                out.examples.append(ControlledExample(prompt, r.response, {self.preference: control}, r.source))

    def _scores(self, out: ParsedRecord) -> None:
        cuts = score_cuts(self.cfg, [r.value for r in self.replies])
        labels = score_labels(self.cfg)
        for prompt, group in _by_prompt(self.replies):
            binned = [(bisect.bisect_right(cuts, r.value), r) for r in group]
            for level, r in binned:
                out.examples.append(ControlledExample(prompt, r.response, {self.preference: labels[level]}, r.source))
            best_first = sorted(binned, key=lambda item: -item[0])
            for (high, better), (low, worse) in combinations(best_first, 2):
                if high > low and better.response.strip() != worse.response.strip():
                    pair = PreferencePair(
                        prompt, better.response, worse.response, self.preference, labels[high], labels[low], better.source
                    )
                    out.pairs.append(pair)


def _text_parts(item: Any) -> Any:
    """A message whose ``content`` is a list of ``{"type": "text", "text": ...}`` parts, as one string."""
    content = item.get("content") if isinstance(item, Mapping) else None
    if not isinstance(content, list):
        return item
    if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return item  # _message names the problem
    return {**item, "content": "\n".join(p["text"] for p in content)}


def _first_feedback(item: Mapping[str, Any]) -> Any:
    return next((item[key] for key in _FEEDBACK_KEYS if item.get(key) is not None), None)


def _by_prompt(replies: Iterable[_Reply]) -> list[tuple[tuple, list[_Reply]]]:
    """Replies grouped by their prompt (the turns before them), groups in first-seen order."""
    groups: dict[tuple, tuple[tuple, list[_Reply]]] = {}
    for r in replies:
        key = tuple((t["role"], t["content"]) for t in r.prompt)
        groups.setdefault(key, (r.prompt, []))[1].append(r)
    return list(groups.values())


def _distinct(replies: Iterable[_Reply]) -> list[_Reply]:
    """The first of each different response text (a reply logged twice is paired once)."""
    seen: dict[str, _Reply] = {}
    for r in replies:
        seen.setdefault(r.response.strip(), r)
    return list(seen.values())
