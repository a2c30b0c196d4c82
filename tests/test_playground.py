"""``playground``: one prompt answered side by side per control choice, in a local Gradio page."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from helpers.tiny_models import controlled_tiny_model

from meet_lightning.inference.generation import DecodingOptions

gr = pytest.importorskip("gradio")  # the ui extra (the dev extra has it)
from gradio_client import Client  # noqa: E402 — only once gradio is known to be there

from meet_lightning.inference.playground import NONE, build_app, columns_html, combinations, compare  # noqa: E402

DECODING = DecodingOptions(max_new_tokens=12, repetition_penalty=5.0)
PROMPT = "Name a planet."


@pytest.fixture(scope="module")
def model():
    return controlled_tiny_model()


def test_the_combinations_offered(model):
    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.inference.export import AlignedModel

    assert combinations(model) == [NONE, "length/concise", "length/verbose"]
    two = AlignedModel(model.lm, model.tokenizer, model.control, ControlSchema.from_dict({"a": ["x", "y"], "b": ["z"]}))
    assert combinations(two) == [NONE, "a/x", "a/y", "b/z", "a/x + b/z", "a/y + b/z"]


def test_each_column_is_what_generate_answers(model):
    rows = compare(model, PROMPT, [NONE, "length/concise", "length/verbose"], DECODING)
    for row, controls in zip(rows, [None, ["length/concise"], ["length/verbose"]], strict=True):
        (want,) = model.generate([PROMPT], control=controls, options=DECODING, batch_size=1)
        assert row["answer"] == want and row["words"] == len(want.split())
    assert rows[1]["answer"] != rows[2]["answer"]  # the controls change the answer, so the check above can tell
    page = columns_html([{"controls": "<b>", "words": 1, "answer": "<script>x</script>"}])
    assert "<script>" not in page and "&lt;script&gt;" in page  # answers and names are text, never markup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(model):
    """The app served on loopback for the module: its URL."""
    app = build_app(model, DECODING, "tiny")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_the_api_answers_side_by_side(model, page):
    client = Client(page, verbose=False)
    html, rows = client.predict(PROMPT, ["length/concise", "length/verbose"], api_name="/compare")
    assert [r["controls"] for r in rows] == ["length/concise", "length/verbose"]
    assert rows == compare(model, PROMPT, ["length/concise", "length/verbose"], DECODING)
    assert html.index("length/concise") < html.index("length/verbose")
    with pytest.raises(Exception, match="tick at least one"):
        client.predict(PROMPT, [], api_name="/compare")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_in_a_headless_browser(page, tmp_path):
    """The real page rendered by Chromium: its controls are on it, and a screenshot is taken."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    for name in ("length/concise", "length/verbose", "control combinations", "answer"):
        assert name in dom, name
    shot = tmp_path / "playground.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,900", page], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000  # a rendered page, not an empty frame


def test_without_gradio_the_command_names_the_extra(monkeypatch, capsys):
    import sys

    from meet_lightning.commands.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the ui extra were not installed
    monkeypatch.delitem(sys.modules, "meet_lightning.inference.playground")
    assert main(["playground", "--model", "tiny-debug"]) == 2
    assert "pip install 'meet_lightning[ui]'" in capsys.readouterr().err
