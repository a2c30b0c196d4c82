"""``python -m meet_lightning chat --model DIR``: talk to a model in the terminal, switching controls between turns.

The conversation is kept (every turn is context for the next); the chosen controls apply to each new answer,
as ``generate --control`` does. Lines starting with ``/`` are commands::

    /controls concise          answer under these controls from now on (several: /controls harmless/good concise)
    /controls none             no control
    /controls                  show the active controls and every control the model knows
    /reset                     forget the conversation (the controls stay)
    /quit                      leave (as do end of input and Ctrl-D)

Answers stream token by token. Works on an export (with its controls), a plain Hugging Face folder, an alias or
a hub id (no controls; ``/controls`` then says so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from meet_lightning.errors import ConfigError
from meet_lightning.inference.generation import DecodingOptions, resolve_controls

HELP = "commands: /controls NAME… | /controls none | /controls | /reset | /quit"


class TokenPrinter:
    """A transformers streamer that writes each new piece of text as soon as it decodes to whole characters.

    ``generate(inputs_embeds=…)`` hands it only new tokens, one step at a time (batch of one). The text so far is
    decoded again each step and only what it adds is written, so a character split over two tokens is written
    once it is complete. The pieces join to the answer ``generate`` returns (stripped): leading whitespace is
    never written and trailing whitespace only once more text follows it.

    Args:
        tokenizer: Decodes the ids.
        write: Receives each new piece.
        end: Written after the answer (the terminal's newline; nothing for a server).
    """

    def __init__(self, tokenizer: Any, write: Callable[[str], None], end: str = "\n") -> None:
        self.tokenizer, self.write, self.end_text = tokenizer, write, end
        self.ids: list[int] = []
        self.shown = ""

    def put(self, value: Any) -> None:
        """Receives the newest token ids ``(1, n)`` or ``(n,)``."""
        self.ids += [int(t) for t in value.reshape(-1).tolist()]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
            return
        self._show(text.strip())

    def end(self) -> None:
        """Called once the answer is complete: writes what is still held back, then ``end``."""
        self._show(self.tokenizer.decode(self.ids, skip_special_tokens=True).strip())
        if self.end_text:
            self.write(self.end_text)

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown):
            self.write(text[len(self.shown) :])
            self.shown = text


class ChatSession:
    """The state of one conversation: its turns and the controls chosen for the next answer.

    Args:
        model: An :class:`~meet_lightning.inference.export.AlignedModel`.
        decoding: How answers are decoded.
        controls: Controls to start with (names as ``generate --control`` takes them).
    """

    def __init__(self, model: Any, decoding: DecodingOptions, controls: list[str] | None = None) -> None:
        self.model, self.decoding = model, decoding
        self.messages: list[dict[str, str]] = []
        self.controls: list[str] = []
        self.choose(controls or [])

    def choose(self, names: list[str]) -> str:
        """Sets the controls for the next answers; returns the line to show. Unknown names change nothing."""
        names = [] if names == ["none"] else names
        if names and not self.model.controls:
            return "this model has no controls (a plain model): answers stay uncontrolled"
        try:
            resolve_controls(self.model.schema, names)
        except ConfigError as error:
            return str(error)
        self.controls = names
        return self.status()

    def status(self) -> str:
        """The active controls, and what the model knows."""
        known = ", ".join(self.model.controls) or "none (a plain model)"
        return f"controls: {' + '.join(self.controls) or 'none'} (known: {known})"

    def answer(self, text: str, write: Callable[[str], None]) -> str:
        """Answers ``text`` in the conversation so far, streaming it through ``write``; returns the answer."""
        self.messages.append({"role": "user", "content": text})
        printer = TokenPrinter(self.model.tokenizer, write)
        (reply,) = self.model.generate(
            [list(self.messages)],
            control=self.controls or None,
            streamer=printer,
            options=self.decoding,
            batch_size=1,
        )
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def handle(self, line: str, write: Callable[[str], None]) -> bool:
        """One line of input: a command or a user turn. Returns ``False`` when the user leaves."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/reset":
            self.messages = []
            write("conversation cleared; " + self.status() + "\n")
        elif line == "/controls":
            write(self.status() + "\n")
        elif line.startswith("/controls "):
            write(self.choose(line.split()[1:]) + "\n")
        elif line.startswith("/"):
            write(f"unknown command {line.split()[0]} — {HELP}\n")
        else:
            self.answer(line, write)
        return True


def run_chat(session: ChatSession, lines: Iterable[str], write: Callable[[str], None], prompt: str = "> ") -> None:
    """Reads ``lines`` (stdin, or a script) until ``/quit`` or their end, answering each user turn."""
    write(f"{session.status()}\n{HELP}\n{prompt}")
    for line in lines:
        if not session.handle(line, write):
            return
        write(prompt)
    write("\n")


def check_decoding(decoding: DecodingOptions) -> None:
    """One line for bad decoding flags, before the model is loaded."""
    problems = decoding.problems()
    if problems:
        raise ConfigError("; ".join(problems))
