"""The README: every code block runs (as written, see ``tests/helpers/doc_blocks.py``), it stays short, and its links
into the documentation site lead to pages that exist."""

from __future__ import annotations

import re

from helpers.doc_blocks import ROOT, page_blocks, run_page

README = ROOT / "README.md"
MAX_BYTES = 12_000


def test_every_readme_block_runs(tmp_path, monkeypatch, shared_data, capsys):
    commands = run_page(README, shared_data, tmp_path, monkeypatch, capsys)
    assert {args[0] for args in commands} >= {"fit", "generate"}
    assert (tmp_path / "runs/mine/export/meet_schema.json").is_file()  # the quickstart's own export


def test_readme_is_short_and_has_the_three_quickstarts():
    assert len(README.read_bytes()) <= MAX_BYTES
    languages = [block.lang for block in page_blocks(README)]
    assert languages.count("python") >= 2 and languages.count("bash") >= 2


def test_readme_links_lead_somewhere():
    for target in re.findall(r"\]\(([^)#\s]+)", README.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
