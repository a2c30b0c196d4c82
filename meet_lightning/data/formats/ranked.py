"""OpenAssistant message trees (``ranked``): the ranked sibling replies at every prompter message, compared."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from itertools import combinations
from typing import Any

from meet_lightning.data.formats.base import DataFormat, SourceConfig
from meet_lightning.data.formats.records import _EMPTY_SIDE, BadRow, ParsedRecord, _kind, _short
from meet_lightning.data.rows import ControlledExample
from meet_lightning.errors import DataError


class Ranked(DataFormat):
    """OpenAssistant message trees: ``prompt`` is the root message ``{text, role, replies[...]}``.

    At every prompter message, its assistant replies that have a ``rank`` (0 = best) are compared; replies
    without a rank, and deleted ones, are left out; synthetic replies are kept (their rank is a human
    judgement like any other). ``all_pairs`` pairs every two ranked siblings (lower rank chosen);
    ``best_vs_rest`` pairs the best-ranked reply with each other ranked sibling. Siblings with equal ranks
    are not compared. The prompt of a reply is the whole path from the root to its parent. Every reply that
    takes part in a pair is one example: the best-ranked one under ``chosen_control``, the others under
    ``rejected_control``. A file where no reply has a rank is an error.
    """

    name = "ranked"
    summary = "prompt message tree with replies and rank"
    _NODE_ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}
    _TREE_FIX = 'write each message as {"text": ..., "role": "prompter", "rank": 0, "replies": [...]}'

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.saw_rank = False
        self.rows = 0

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "prompt")
        self.rows += 1
        out = ParsedRecord()
        stack: list[tuple[Any, tuple, str]] = [(rec["prompt"], (), "prompt")]
        while stack:  # depth-first, iterative: trees can be deep
            node, path, at = stack.pop()
            message, replies = self._node(node, at)
            history = path + (message,)
            if message["role"] == "user":
                self._compare(replies, history, at, source, out)
            stack.extend((r, history, f"{at}.replies[{i}]") for i, r in reversed(list(enumerate(replies))))
        return out

    def _node(self, node: Any, at: str) -> tuple[dict[str, str], list]:
        if not isinstance(node, Mapping):
            raise BadRow(f"{at} is {_kind(node)}, expected a message object", self._TREE_FIX, "type")
        role, text, replies = node.get("role"), node.get("text"), node.get("replies")
        replies = [] if replies is None else replies
        if not isinstance(role, str) or role not in self._NODE_ROLES:
            reason = f"{at}.role is {_short(role)}, expected 'prompter' or 'assistant'"
            raise BadRow(reason, self._TREE_FIX, "type")
        if not isinstance(text, str):
            raise BadRow(f"{at}.text is {_kind(text)}, expected a string", self._TREE_FIX, "type")
        if not isinstance(replies, list):
            raise BadRow(f"{at}.replies is {_kind(replies)}, expected a list", self._TREE_FIX, "type")
        return {"role": self._NODE_ROLES[role], "content": text}, replies

    def _ranked_replies(self, replies: list, at: str) -> list[tuple[float, int, str]]:
        """``(rank, position, text)`` of the ranked, not deleted assistant replies, best first."""
        ranked = []
        for i, reply in enumerate(replies):
            where = f"{at}.replies[{i}]"
            message, _ = self._node(reply, where)
            if reply.get("rank") is None or message["role"] != "assistant" or reply.get("deleted") is True:
                continue
            rank = reply["rank"]
            if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank):
                reason = f"{where}.rank is {_short(rank)}, expected a number (0 = best)"
                raise BadRow(reason, self._TREE_FIX, "type")
            ranked.append((rank, i, message["content"]))
        self.saw_rank = self.saw_rank or bool(ranked)
        return sorted(ranked)

    def _compare(self, replies: list, history: tuple, at: str, source: str, out: ParsedRecord) -> None:
        ranked = self._ranked_replies(replies, at)
        if len(ranked) < 2:
            return
        prompt = self._finish_prompt(history)
        if self.cfg.pairing == "all_pairs":
            candidates: Iterable = combinations(ranked, 2)
        else:
            candidates = ((ranked[0], other) for other in ranked[1:])
        used: set[int] = set()
        for better, worse in candidates:
            if better[0] == worse[0]:
                out.warnings.append("sibling replies share a rank (not compared)")
            elif better[2].strip() == worse[2].strip():
                out.warnings.append("sibling replies are identical (not compared)")
            else:
                out.warnings.extend(_EMPTY_SIDE for text in (better[2], worse[2]) if not text.strip())
                out.pairs.append(self._pair(prompt, better[2], worse[2], source))
                used.update((better[1], worse[1]))
        best = ranked[0][0]
        for rank, position, text in ranked:
            if position in used:
                control = self.cfg.chosen_control if rank == best else self.cfg.rejected_control
                out.examples.append(ControlledExample(prompt, text, {self.preference: control}, source))

    def finish(self) -> ParsedRecord:
        if self.rows and not self.saw_rank:
            raise DataError(
                f"{self.cfg.path}: no assistant reply in {self.rows} trees has a rank — ranked data needs "
                "'rank' (0 = best) on sibling replies; for other data set --data.format"
            )
        return ParsedRecord()
