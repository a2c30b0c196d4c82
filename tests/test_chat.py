"""``chat``: a terminal conversation that streams answers and switches controls between turns."""

from __future__ import annotations

import pytest

from meet_lightning.chat import ChatSession, TokenPrinter, run_chat
from meet_lightning.generation import DecodingOptions


@pytest.fixture(scope="module")
def model():
    import torch

    from meet_lightning import PromptTuningControl
    from meet_lightning.examples import ControlSchema
    from meet_lightning.export import AlignedModel
    from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    lm = build_tiny_model(tokenizer)
    schema = ControlSchema.from_dict({"length": ["concise", "verbose"]})
    control = PromptTuningControl(num_tokens=2, init="random", seed=1)
    control.setup(lm, tokenizer, schema)
    with torch.no_grad():
        control.bank.mul_(20)  # controls that visibly change the tiny model's greedy answer
        lm.get_output_embeddings().weight[:3] = 0  # the untrained tiny model would end every answer at once
    return AlignedModel(lm, tokenizer, control, schema)


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
    assert first == model.generate(["hello there"], **DECODING.generate_kwargs())[0]
    history = [*session.messages[:2], {"role": "user", "content": "and again"}]
    assert second == model.generate([history], control="concise", **DECODING.generate_kwargs())[0]
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
    from meet_lightning.control import ControlTokens
    from meet_lightning.examples import ControlSchema
    from meet_lightning.export import AlignedModel

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
    printer.put(torch.tensor([0xC3]))  # a character cut off by the end of the answer is still written
    printer.end()
    assert out[-1] == "\ufffd\n"
