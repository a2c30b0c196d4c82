"""``chat``: a terminal conversation that streams answers and switches controls between turns."""

from __future__ import annotations

import pytest
from helpers.tiny_models import controlled_tiny_model

from meet_lightning.inference.chat import ChatSession, TokenPrinter, run_chat
from meet_lightning.inference.generation import DecodingOptions


@pytest.fixture(scope="module")
def model():
    return controlled_tiny_model()


DECODING = DecodingOptions(max_new_tokens=12, repetition_penalty=5.0)  # the tiny model repeats one byte otherwise


def transcript(model, lines: list[str]) -> tuple[str, ChatSession, list[str]]:
    pieces: list[str] = []
    session = ChatSession(model, DECODING)
    run_chat(session, lines, pieces.append)
    return "".join(pieces), session, pieces


def test_answers_stream_and_equal_what_generate_returns_for_the_same_conversation_and_controls(model):
    text, session, pieces = transcript(model, ["hello there", "/controls concise", "and again"])
    first, second = session.messages[1]["content"], session.messages[3]["content"]
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert first == model.generate(["hello there"], options=DECODING)[0]
    history = [*session.messages[:2], {"role": "user", "content": "and again"}]
    assert second == model.generate([history], control="concise", options=DECODING)[0]
    assert first and second != first and first in text and second in text
    assert len(pieces) > 12  # streamed a piece at a time, not one write per answer


def test_the_streamed_text_is_the_answer(model):
    pieces: list[str] = []
    reply = ChatSession(model, DECODING, ["verbose"]).answer("stream this", pieces.append)
    assert len(pieces) > 3 and "".join(pieces).strip() == reply


def test_control_commands_show_switch_refuse_and_clear(model):
    text, session, _ = transcript(
        model, ["/controls verbose", "/controls", "/controls bogus", "/controls none", "/reset", "/nope", "/quit", "never read"]
    )
    assert "controls: verbose (known: length/concise, length/verbose)" in text
    assert "control 'bogus' is unknown — known controls: length/concise, length/verbose" in text
    assert "controls: none (known:" in text and "conversation cleared" in text
    assert "unknown command /nope" in text
    assert session.controls == [] and session.messages == []  # /quit stopped before "never read"


def test_a_plain_model_chats_without_controls(model):
    from meet_lightning.controls.tokens import ControlTokens
    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.inference.export import AlignedModel

    plain = AlignedModel(model.lm, model.tokenizer, ControlTokens(), ControlSchema.from_dict({}))
    text, session, _ = transcript(plain, ["/controls concise", "hi"])
    assert "this model has no controls" in text and len(session.messages) == 2


def test_the_printer_waits_for_a_whole_character():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    import torch

    out: list[str] = []
    printer = TokenPrinter(Bytes(), out.append)
    for byte in "é!".encode():
        printer.put(torch.tensor([byte]))
    printer.end()
    assert out == ["é", "!", "\n"]
    cut = TokenPrinter(Bytes(), out.append)
    cut.put(torch.tensor([0xC3]))  # a character cut off by the end of the answer is still written
    cut.end()
    assert out[-2:] == ["\ufffd", "\n"]
    # the pieces join to the stripped answer generate returns: no leading space, trailing space only before text
    pieces: list[str] = []
    spaced = TokenPrinter(Bytes(), pieces.append, end="")
    for byte in b" a b ":
        spaced.put(torch.tensor([byte]))
    spaced.end()
    assert pieces == ["a", " b"]


def test_the_chat_command_in_a_pseudo_terminal(tmp_path):
    """The real command in a terminal: it prompts, streams an answer, takes commands and leaves on /quit."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path / "plain"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    main, child = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "meet_lightning", "chat", "--model", str(folder), "--max_new_tokens", "6", "--device", "cpu"]
    process = subprocess.Popen(command, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    seen = b""

    def read_until(prompts: int, seconds: float = 120) -> None:
        """Reads until the ``> `` prompt has been shown ``prompts`` times."""
        nonlocal seen
        deadline = time.monotonic() + seconds
        while seen.count(b"\n> ") + seen.startswith(b"> ") < prompts and time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
        assert seen.count(b"\n> ") >= prompts, seen.decode(errors="replace")[-2000:]

    try:
        read_until(1)
        os.write(main, b"/controls concise\n")
        read_until(2)
        os.write(main, b"hello\n")
        read_until(3)
        os.write(main, b"/quit\n")
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(main)
    text = seen.decode(errors="replace")
    assert "this model has no controls" in text  # the /controls answer
    after_hello = text.split("hello", 1)[1]
    assert after_hello.count("\n> ") == 1  # an answer (perhaps empty for the untrained model), then the prompt


def test_a_start_control_the_model_does_not_know_is_one_line_exit_2(tmp_path, capsys):
    from meet_lightning.commands.cli import main
    from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path / "plain"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["chat", "--model", str(folder), "--control", "concise", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --control: this model has no controls (a plain model): answers stay uncontrolled"


def test_a_list_of_controls_in_a_config_file_is_read_as_names():
    from meet_lightning.commands.inference import control_names

    assert control_names(["['concise', 'harmless/good']"]) == ["concise", "harmless/good"]
    assert control_names(["concise", "harmless/good"]) == ["concise", "harmless/good"]
    assert control_names([]) == []
    assert control_names("concise") == ["concise"] and control_names("['concise']") == ["concise"]  # from a file


def test_generate_takes_decoding_options_whole_and_keywords_over_them(model):
    """``AlignedModel.generate(options=…)`` decodes as the keywords it stands for; a keyword given beside the
    options wins; a name that is no decoding option is refused."""
    whole = model.generate(["count to ten"], options=DECODING)
    assert whole == model.generate(["count to ten"], max_new_tokens=12, repetition_penalty=5.0)
    shorter = model.generate(["count to ten"], options=DECODING, max_new_tokens=3)
    assert shorter == model.generate(["count to ten"], max_new_tokens=3, repetition_penalty=5.0) != whole
    with pytest.raises(TypeError, match="max_tokens"):
        model.generate(["count to ten"], max_tokens=3)
