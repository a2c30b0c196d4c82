"""The canonical rows every data format is turned into.

A *preference* (``harmless``, ``length``…) has *controls* (``good``/``bad``, ``concise``/``verbose``). A
training row is a :class:`ControlledExample`; a human comparison is a :class:`PreferencePair`, which gives two
training rows and is what validation scores with the control classifier.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meet_lightning.names import check_name

Message = Mapping[str, str]
"""One chat turn: ``{"role": "system" | "user" | "assistant", "content": str}``."""


@dataclass(frozen=True)
class ControlledExample:
    """One training row: the model learns ``response`` given ``prompt`` and ``controls``.

    Attributes:
        prompt: Chat turns before the response; the last one is a ``user`` turn.
        response: The assistant reply the loss is computed on.
        controls: ``{preference: control}`` for every preference this row is labelled for. A preference
            missing here gets no control token.
        source: ``FILE:ROW`` the row came from, for messages.
    """

    prompt: tuple[Message, ...]
    response: str
    controls: Mapping[str, str]
    source: str = ""


@dataclass(frozen=True)
class PreferencePair:
    """Two responses to one prompt, ``chosen`` preferred over ``rejected`` for ``preference``.

    Attributes:
        prompt: Chat turns before the responses.
        chosen: The preferred response.
        rejected: The other response.
        preference: Which preference the comparison is about.
        chosen_control: Control label the chosen response trains under (default ``good``).
        rejected_control: Control label the rejected response trains under (default ``bad``).
        source: ``FILE:ROW`` the pair came from.
    """

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    preference: str
    chosen_control: str = "good"
    rejected_control: str = "bad"
    source: str = ""

    def examples(self) -> tuple[ControlledExample, ControlledExample]:
        """The two training rows of this pair: chosen under its control, rejected under the other."""
        return (
            ControlledExample(self.prompt, self.chosen, {self.preference: self.chosen_control}, self.source),
            ControlledExample(self.prompt, self.rejected, {self.preference: self.rejected_control}, self.source),
        )


@dataclass
class ParsedSource:
    """Everything read from one data source, with what was skipped and why.

    Attributes:
        path: The file or hub id as the user gave it.
        format: The format used (resolved when ``auto``).
        rows_read: Records read from the file (before any skipping).
        pairs: Pairwise comparisons (empty for pointwise data).
        examples: All training rows: both sides of every pair plus pointwise rows.
        skipped: ``{reason: count}`` of records that produced nothing.
        skipped_rows: ``{reason: [row, ...]}`` the 1-based rows behind each ``skipped`` count, so a user can
            look them up.
        warnings: ``{what: count}`` of suspicious but usable records (e.g. chosen identical to rejected).
    """

    path: str
    format: str
    rows_read: int = 0
    pairs: list[PreferencePair] = field(default_factory=list)
    examples: list[ControlledExample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: dict[str, list[int]] = field(default_factory=dict)
    warnings: Counter = field(default_factory=Counter)

    def preferences(self) -> dict[str, list[str]]:
        """``{preference: [controls in first-seen order]}`` over all examples.

        Every name is checked against the library's one rule (:func:`~meet_lightning.names.check_name`) the first
        time it is seen, so the error names the row it came from.

        Raises:
            DataError: A preference or label name the rule refuses (it would become a folder, token or template text).
        """
        schema: dict[str, list[str]] = {}
        for example in self.examples:
            for preference, control in example.controls.items():
                if preference not in schema:
                    check_name("preference", preference, example.source or self.path)
                labels = schema.setdefault(preference, [])
                if control not in labels:
                    check_name("label", control, example.source or self.path)
                    labels.append(control)
        return schema


@dataclass(frozen=True)
class ControlSchema:
    """The preferences of a run and their controls, in a fixed order.

    Every ``(preference, control)`` has one global id, numbered preference by preference in schema order;
    batches carry these ids, and control-token banks are indexed by them.

    Attributes:
        preferences: ``{preference: [control, ...]}``, e.g. ``{"harmless": ["good", "bad"]}``.
    """

    preferences: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_dict(cls, preferences: Mapping[str, list[str] | tuple[str, ...]]) -> ControlSchema:
        """Builds a schema from ``{preference: [controls]}`` (the YAML/checkpoint form)."""
        return cls({name: tuple(labels) for name, labels in preferences.items()})

    def to_dict(self) -> dict[str, list[str]]:
        """The YAML/checkpoint form: ``{preference: [controls]}``."""
        return {name: list(labels) for name, labels in self.preferences.items()}

    @property
    def names(self) -> list[str]:
        """``preference/control`` for every global id, in id order."""
        return [f"{pref}/{label}" for pref, labels in self.preferences.items() for label in labels]

    @property
    def num_controls(self) -> int:
        """Number of global control ids."""
        return sum(len(labels) for labels in self.preferences.values())

    def control_id(self, preference: str, control: str) -> int:
        """Global id of ``control`` of ``preference``; ValueError naming the known ones if unknown."""
        offset = 0
        for name, labels in self.preferences.items():
            if name == preference:
                if control not in labels:
                    raise ValueError(f"unknown control {control!r} for preference {preference!r}; known: {', '.join(labels)}")
                return offset + labels.index(control)
            offset += len(labels)
        raise ValueError(f"unknown preference {preference!r}; known: {', '.join(self.preferences)}")

    def encode(self, controls: Mapping[str, str]) -> list[int]:
        """One global id per preference in schema order, ``-1`` where ``controls`` has no label for it."""
        unknown = set(controls) - set(self.preferences)
        if unknown:
            raise ValueError(f"unknown preference {sorted(unknown)[0]!r}; known: {', '.join(self.preferences)}")
        return [self.control_id(p, controls[p]) if p in controls else -1 for p in self.preferences]

    def decode(self, ids: Sequence[int]) -> dict[str, str]:
        """``{preference: control}`` of :meth:`encode`'s ids (``-1`` entries are left out)."""
        names = [(pref, label) for pref, labels in self.preferences.items() for label in labels]
        return dict(names[i] for i in ids if i >= 0)
