"""``serve``: an OpenAI-compatible endpoint where each request chooses its controls, driven by the ``openai`` client."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from helpers.tiny_models import controlled_tiny_model

from meet_lightning.inference.generation import DecodingOptions
from meet_lightning.inference.serve import ControlServer, make_server

openai = pytest.importorskip("openai")  # the dev extra has it

DECODING = DecodingOptions(max_new_tokens=12, repetition_penalty=5.0)  # the tiny model repeats one byte otherwise
QUESTION = [{"role": "user", "content": "Name a planet."}]


@pytest.fixture(scope="module")
def served():
    """(client, model, base URL) for a server on a free loopback port, stopped after the module."""
    model = controlled_tiny_model()
    server = make_server(ControlServer(model, "tiny", DECODING), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0), model, url
    server.shutdown()
    server.server_close()


def expected(model, controls: list[str] | None) -> str:
    return model.generate([QUESTION], control=controls, options=DECODING, batch_size=1)[0]


def test_models_lists_the_controls(served):
    client, model, _ = served
    (entry,) = client.models.list().data
    assert entry.id == "tiny" and entry.model_extra["controls"] == ["length/concise", "length/verbose"]


@pytest.mark.parametrize("controls", [["concise"], ["verbose"], None])
def test_each_way_of_choosing_controls_answers_as_generate_does(served, controls):
    client, model, _ = served
    want = expected(model, controls)
    directive = [{"role": "system", "content": f"controls: {', '.join(controls or ['none'])}"}]
    answers = [
        client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"controls": controls}),
        client.chat.completions.create(
            model="tiny", messages=QUESTION, extra_body={"chat_template_kwargs": {"controls": controls}}
        ),
        client.chat.completions.create(model="tiny", messages=directive + QUESTION),
    ]
    for answer in answers:
        assert answer.choices[0].message.content == want
        assert answer.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny", messages=directive + QUESTION, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_controls_change_the_answer(served):
    client, _, _ = served
    texts = {
        name: client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"controls": [name]})
        .choices[0]
        .message.content
        for name in ("concise", "verbose")
    }
    assert texts["concise"] != texts["verbose"]  # otherwise the equality test above could not tell controls apart


def test_a_full_answer_reports_length(served):
    client, _, _ = served
    answer = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": QUESTION, "controls": ["nope"]}, "control 'nope' is unknown"),
        ({"messages": QUESTION, "stream": True, "controls": ["nope"]}, "control 'nope' is unknown"),
        ({"messages": QUESTION, "n": 2}, "not supported by this server: n"),
        ({"messages": QUESTION, "stop": ["\n"]}, "not supported by this server: stop"),
        ({"messages": QUESTION, "temperature": -1}, "temperature -1 must be ≥ 0"),
        ({"messages": QUESTION, "max_tokens": "ten"}, "max_tokens must be a number"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "system", "content": "controls: concise"}]}, "only the controls directive"),
        ({"messages": QUESTION, "controls": "concise"}, "controls must be a list"),
    ],
)
def test_bad_requests_are_a_400_naming_the_field(served, body, message):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body={"model": "tiny", **body}, cast_to=object)
    assert message in caught.value.body["message"]


def test_not_json_and_unknown_routes(served):
    _, _, url = served
    request = urllib.request.Request(f"{url}/chat/completions", data=b"{oops", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400 and "not JSON" in json.loads(caught.value.read())["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{url}/nowhere", timeout=30)
    assert caught.value.code == 404


def test_the_serve_command_on_an_export(tmp_path):
    """The real command in its own process: it prints its address, answers the client, and stops on a signal."""
    import signal
    import subprocess
    import sys

    from meet_lightning.inference.export import export_model
    from meet_lightning.models import model_fingerprint

    model = controlled_tiny_model()
    export_model(
        tmp_path / "export", model.lm, model.tokenizer, model.control, model.schema, "tiny-debug", model_fingerprint(model.lm)
    )
    command = [sys.executable, "-m", "meet_lightning", "serve", "--model", str(tmp_path / "export"), "--port", "0",
               "--max_new_tokens", "12", "--repetition_penalty", "5.0", "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving "), line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
        directive = [{"role": "system", "content": "controls: concise"}]
        answer = client.chat.completions.create(model="any", messages=directive + QUESTION)
        assert answer.choices[0].message.content == expected(model, ["concise"])
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
