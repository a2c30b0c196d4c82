"""Formats whose records compare responses: HH-RLHF transcripts (``hh_rlhf``), prompt / chosen / rejected
(``pairwise``), sharegpt conversations (``sharegpt``), one response column per control (``multi_response``) and
PandaLM's annotator votes (``pairwise_votes``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping
from itertools import combinations
from typing import Any

from meet_lightning.data.formats.base import TIE_CONTROL, DataFormat, SourceConfig
from meet_lightning.data.formats.records import (
    _EMPTY_SIDE,
    BadRow,
    ParsedRecord,
    _message,
    _messages,
    _Missing,
    _response,
    _short,
    _text,
)
from meet_lightning.data.rows import ControlledExample, PreferencePair


class HHRLHF(DataFormat):
    """Anthropic HH-RLHF: ``chosen`` / ``rejected`` transcripts ``"\\n\\nHuman: …\\n\\nAssistant: …"``.

    The prompt is everything before the last ``\\n\\nAssistant:`` (its turns become user/assistant
    messages); the response is the text after it, stripped. Turns are split on the ``\\n\\nHuman:`` /
    ``\\n\\nAssistant:`` markers only, so a response that says "Human:" mid-line stays whole. A pair whose
    transcripts differ before the last Assistant turn is not one comparison: it is skipped and counted.
    An empty last Assistant turn is kept as an empty response (counted in ``warnings``).
    """

    name = "hh_rlhf"
    summary = "chosen, rejected transcripts"
    _TURN = re.compile(r"\n\n(Human|Assistant):")
    _HH_ROLES = {"Human": "user", "Assistant": "assistant"}

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "chosen", "rejected")
        chosen_prefix, chosen = self._split(self._string(rec, "chosen"), "chosen")
        rejected_prefix, rejected = self._split(self._string(rec, "rejected"), "rejected")
        out = ParsedRecord()
        if chosen_prefix != rejected_prefix:
            out.skipped.append("chosen and rejected differ before the last Assistant turn")
            return out
        prompt = self._finish_prompt(self._turns(chosen_prefix, "chosen"))
        out.add_pair(self._pair(prompt, chosen, rejected, source))
        return out

    def _split(self, transcript: str, name: str) -> tuple[str, str]:
        if transcript.startswith(("Human:", "Assistant:")):
            transcript = "\n\n" + transcript  # the marker at the very start has no blank line before it
        cut = transcript.rfind("\n\nAssistant:")
        if cut < 0:
            raise BadRow(
                f"{name} has no '\\n\\nAssistant:' turn",
                "HH-RLHF transcripts end with an Assistant turn; for prompt/chosen/rejected data, or pairs without"
                " Human:/Assistant: markers (TRL implicit prompt), set --data.format pairwise",
            )
        return transcript[:cut], transcript[cut + len("\n\nAssistant:") :].strip()

    def _turns(self, prefix: str, name: str) -> list[dict[str, str]]:
        marks = list(self._TURN.finditer(prefix))
        if not marks or prefix[: marks[0].start()].strip():
            fix = "start the transcript with '\\n\\nHuman:' or set --data.format pairwise"
            raise BadRow(f"{name} does not start with a 'Human:' turn", fix)
        ends = [m.start() for m in marks[1:]] + [len(prefix)]
        return [
            {"role": self._HH_ROLES[m.group(1)], "content": prefix[m.end() : end].strip()}
            for m, end in zip(marks, ends, strict=True)
        ]


class Pairwise(DataFormat):
    """``prompt`` / ``chosen`` / ``rejected`` (TRL "standard" and "conversational"), prompt explicit or implicit.

    Each field is a string or a list of ``{role, content}`` messages. A message-list ``chosen`` /
    ``rejected`` ends with the assistant response; the turns before it continue the prompt (TRL's implicit
    prompt, where ``prompt`` may then be absent) and must be the same on both sides, else the pair is
    skipped and counted. Without a ``prompt`` column, plain-string ``chosen`` / ``rejected`` (TRL's
    standard implicit prompt, ``"The sky is blue."`` / ``"The sky is green."``) share their prompt as
    leading text: it ends at the last whitespace of the common prefix, so both responses start on a word
    (``"blue."`` / ``"green."``); strings that share no such text are a bad row.
    """

    name = "pairwise"
    summary = "prompt, chosen, rejected"
    uses_template = True

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "chosen", "rejected")
        out = ParsedRecord()
        chosen_head, chosen = self._reply_turns(rec, "chosen", out)
        rejected_head, rejected = self._reply_turns(rec, "rejected", out)
        if chosen_head != rejected_head:
            out.skipped.append("chosen and rejected differ before the last assistant turn")
            return out
        no_prompt = "prompt" not in rec and self.cfg.prompt_template is None
        if no_prompt and not chosen_head:  # TRL standard, implicit prompt: the shared leading text
            head, chosen, rejected = split_shared_prefix(chosen, rejected)
            turns = [{"role": "user", "content": head}]
        else:
            turns = ([] if no_prompt else self._prompt(rec, raw)) + chosen_head
        out.add_pair(self._pair(self._finish_prompt(turns), chosen, rejected, source))
        return out


_WORD_BREAK = re.compile(r"\s")


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen response, rejected response)`` of two texts that start with the same prompt.

    The prompt is the common leading text up to its last whitespace, so a response never starts inside a
    word (``"Answer: yes"`` / ``"Answer: yesterday"`` → ``"Answer:"``, ``"yes"``, ``"yesterday"``); the
    three parts are stripped. A bad row when no whitespace-ended prompt is shared.
    """
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    breaks = [m.start() for m in _WORD_BREAK.finditer(chosen, 0, shared)]
    prompt = chosen[: breaks[-1]].strip() if breaks else ""
    if not prompt:
        raise BadRow(
            "chosen and rejected share no leading prompt text (no 'prompt' column, no Human:/Assistant: markers)",
            "add the prompt as its own column (--data.columns '{prompt: COLUMN}'), or for HH-RLHF transcripts set"
            " --data.format hh_rlhf",
            "missing",  # a prompt is what is missing: a row of another format is named as such
        )
    cut = breaks[-1]
    return prompt, chosen[cut:].strip(), rejected[cut:].strip()


class ShareGPT(DataFormat):
    """sharegpt-style (LLaMA-Factory): ``conversations`` [{from, value}] + ``chosen`` / ``rejected``.

    ``from`` is system / human / gpt (user / assistant and ``{role, content}`` also work); an optional
    top-level ``system`` string becomes the system turn. ``chosen`` / ``rejected`` are one assistant
    message or a plain string.
    """

    name = "sharegpt"
    summary = "conversations, chosen, rejected"

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "conversations", "chosen", "rejected")
        turns = _messages(rec["conversations"], "field 'conversations'")
        system = rec.get("system")
        if isinstance(system, str) and system.strip() and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": system})
        prompt = self._finish_prompt(turns)
        out = ParsedRecord()
        chosen, rejected = self._reply(rec, "chosen", out), self._reply(rec, "rejected", out)
        out.add_pair(self._pair(prompt, chosen, rejected, source))
        return out

    def _reply(self, rec: Mapping[str, Any], name: str, out: ParsedRecord) -> str:
        value = rec[name]
        text = _text(value, name, out)
        if text is not None:
            return text
        if not isinstance(value, Mapping):
            raise self._wrong_type(name, value, 'a message {"from": "gpt", "value": "..."}')
        message = _message(value, f"field {name!r}")
        if message["role"] != "assistant":
            role = message["role"]
            raise BadRow(f"{name} is a {role} message", f"make {name} a gpt/assistant message", "type")
        return message["content"]


class MultiResponse(DataFormat):
    """A prompt column plus one response column per control (e.g. ``prompt``, ``concise``, ``verbose``).

    Every control column gives one example with controls ``{preference: column name}``; every two control
    columns ``i < j`` (in ``controls`` order, else file order) also form a pair, column ``i`` as chosen, so
    validation can score e.g. concise vs verbose. Identical responses keep their examples but form no pair
    (counted in ``warnings``).
    """

    name = "multi_response"
    summary = "prompt + one response column per control"
    uses_template = True

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.controls: list[str] | None = list(cfg.controls) if cfg.controls else None

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        controls = self.controls = self.controls or self._default_controls(rec)
        prompt = self._finish_prompt(self._prompt(rec, raw))
        self._require(rec, *controls)
        out = ParsedRecord()
        texts = {name: _response(self._response_cell(rec, name, out), name) for name in controls}
        for name, text in texts.items():
            out.examples.append(ControlledExample(prompt, text, {self.preference: name}, source))
        for first, second in combinations(controls, 2):
            if texts[first].strip() == texts[second].strip():
                out.warnings.append("identical responses in two control columns (no pair, examples kept)")
                continue
            pair = PreferencePair(prompt, texts[first], texts[second], self.preference, first, second, source)
            out.pairs.append(pair)
        return out

    def _default_controls(self, rec: Mapping[str, Any]) -> list[str]:
        template = self.cfg.prompt_template or ""
        prompt_columns = {"prompt", "system", *(n for _, n, _, _ in string.Formatter().parse(template) if n)}
        controls = [k for k, v in rec.items() if isinstance(v, str) and k not in prompt_columns]
        if not controls:
            raise BadRow("no response columns besides the prompt", "name them with --data.controls '[a, b]'")
        return controls


class PairwiseVotes(DataFormat):
    """PandaLM: ``instruction``, ``input``, ``response1``, ``response2``, ``annotator1..N`` votes.

    A vote is 1 (response1 better), 2 (response2 better) or 0 (tie). The majority is a vote value given by
    more than half of the annotators (2 of 3): 1 or 2 decides the pair, e.g. votes 1,1,0 choose response1.
    A majority of 0, or no majority (e.g. 1,2,0), is a tie: skipped and counted, or with ``ties: tie`` both
    responses train under control ``tie``. The prompt is the instruction, plus a blank line and the input
    when the input is not empty. The vote columns are the ``annotatorN`` columns of the first record.
    """

    name = "pairwise_votes"
    summary = "instruction, input, response1, response2, annotator1..3"
    uses_template = True
    _VOTE_COLUMN = re.compile(r"annotator(\d+)")
    _VOTE_FIX = "votes are 0 (tie), 1 (response1 better) or 2 (response2 better)"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.vote_columns: list[str] | None = None

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        columns = self.vote_columns = self.vote_columns or self._find_vote_columns(rec)
        self._require(rec, "response1", "response2", *columns)
        prompt = self._finish_prompt(self._instruction(rec, raw))
        out = ParsedRecord()
        responses = {v: self._response_cell(rec, f"response{v}", out) for v in (1, 2)}
        winner = self._majority([self._vote(rec, name) for name in columns])
        if winner is None and self.cfg.ties == "skip":
            out.skipped.append("annotators tie (no majority for either response)")
        elif winner is None:
            out.warnings.extend(_EMPTY_SIDE for text in responses.values() if not text.strip())
            for text in responses.values():
                out.examples.append(ControlledExample(prompt, text, {self.preference: TIE_CONTROL}, source))
        else:
            out.add_pair(self._pair(prompt, responses[winner], responses[3 - winner], source))
        return out

    def _find_vote_columns(self, rec: Mapping[str, Any]) -> list[str]:
        found = [(int(m.group(1)), k) for k in rec if (m := self._VOTE_COLUMN.fullmatch(k))]
        if not found:
            raise _Missing(["annotator1"], self.cfg.columns)
        return [name for _, name in sorted(found)]

    def _instruction(self, rec: Mapping[str, Any], raw: Mapping[str, Any]) -> list[dict]:
        if self.cfg.prompt_template is not None:
            return self._prompt(rec, raw)
        text = self._string(rec, "instruction")
        extra = rec.get("input")
        if extra is not None and not isinstance(extra, str):
            raise self._wrong_type("input", extra, "a string")
        return [{"role": "user", "content": f"{text}\n\n{extra}" if extra and extra.strip() else text}]

    def _vote(self, rec: Mapping[str, Any], name: str) -> int:
        value = rec[name]
        number = value.strip() if isinstance(value, str) else value
        if isinstance(number, bool) or str(number) not in ("0", "1", "2", "0.0", "1.0", "2.0"):
            raise BadRow(f"vote {name} is {_short(value)}", self._VOTE_FIX)
        return int(float(number))

    @staticmethod
    def _majority(votes: list[int]) -> int | None:
        """1 or 2 when more than half of the votes say so, else ``None`` (a tie)."""
        value, count = Counter(votes).most_common(1)[0]
        return value if value != 0 and 2 * count > len(votes) else None
