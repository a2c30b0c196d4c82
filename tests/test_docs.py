"""The documentation site (``docs/``, ``mkdocs.yml``): every code block runs, and what the pages promise holds.

How blocks run is in ``tests/helpers/doc_blocks.py`` (shared with ``tests/test_readme.py``). The site itself is built
by ``make docs`` (``mkdocs build --strict``) in CI; these tests need no MkDocs.
"""

from __future__ import annotations

import re
import sys

import pytest
import yaml
from helpers.doc_blocks import ROOT, command_lines, not_run_markers, page_blocks, run_page, split_env

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
MAX_NOT_RUN = 4
"""Blocks a reader cannot run here (several GPUs, the network): each needs a marker with its reason."""


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(DOCS).as_posix())
def test_every_code_block_of_a_page_runs(page, tmp_path, monkeypatch, shared_data, capsys):
    """Each block runs (run_page asserts every command's exit code and executes every python block), and every
    ``python -m meet_lightning`` line the page shows in a runnable block was run, none skipped."""
    shown = [
        line
        for block in page_blocks(page)
        if block.lang == "bash" and not block.not_run and not block.title
        for line in command_lines(block.body)
        if split_env(line)[1][:3] == ["python", "-m", "meet_lightning"]
    ]
    ran = run_page(page, shared_data, tmp_path, monkeypatch, capsys)
    assert len(ran) == len(shown), (shown, ran)


def test_not_run_markers_are_rare_and_give_a_reason():
    markers = {page: not_run_markers(page) for page in [*PAGES, ROOT / "README.md"]}
    for page, reasons in markers.items():
        assert None not in reasons, f"{page}: a not-run marker must be `<!-- not-run: REASON -->` right before a block"
    assert sum(len(reasons) for reasons in markers.values()) <= MAX_NOT_RUN, markers


def test_blocks_are_runnable_kinds():
    """A block the tests cannot run must say what it is: a saved file (title), output (text), or a marker."""
    for page in PAGES:
        for block in page_blocks(page):
            runnable = block.lang in {"bash", "python"} or block.title or block.not_run
            assert runnable or block.lang in {"text", "yaml", "json"}, f"{page}:{block.line}: ```{block.lang}"
            if block.lang in {"yaml", "json"} and not block.title:
                assert block.lang == "yaml" or block.body.strip().startswith("{"), f"{page}:{block.line}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))

    def entries(nav):
        for item in nav:
            for value in item.values():
                yield from entries(value) if isinstance(value, list) else [value]

    nav = set(entries(config["nav"]))
    generated = {"reference/configuration.md"}
    on_disk = {page.relative_to(DOCS).as_posix() for page in PAGES}
    assert nav - generated == on_disk


def test_the_api_page_covers_the_public_api():
    import meet_lightning

    text = (DOCS / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^::: meet_lightning\.[\w.]*\.(\w+)$", text, re.M))
    assert documented == set(meet_lightning._EXPORTS), set(meet_lightning._EXPORTS) ^ documented
    for name, module in meet_lightning._EXPORTS.items():
        assert f"::: {module}.{name}\n" in text, name  # the path mkdocstrings loads is where the name lives


def test_results_pages_include_the_committed_benchmark_reports():
    """Tables produced by the benchmarks are included (``--8<--``), not copied: each included file exists."""
    included = re.findall(r'^--8<-- "([^"]+)"$', "\n".join(page.read_text() for page in PAGES), re.M)
    assert len(included) >= 5
    for path in included:
        path = re.sub(r"(:\d+)+$", "", path)  # a line range (`FILE:2:7`) includes part of the file
        assert (ROOT / path).is_file(), path


def test_configuration_reference_is_generated_from_the_parsers():
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import generated_pages
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    page = generated_pages.configuration_page()
    for flag in ("--stage1.trainer.max_steps", "--data.format", "--control", "--prompts_file", "--fidelity_prompts"):
        assert flag in page, flag
    assert not (DOCS / "reference" / "configuration.md").exists()  # generated into the site only


PAGE_OF_HELPERS = """
```python title="page_pkg/fmt.py"
from meet_lightning import DataFormat, ParsedRecord, register_format


class Nothing(DataFormat):
    def parse(self, rec, raw, source):
        return ParsedRecord()


register_format("page_nothing", Nothing)
```

```text title="session.txt"
/controls concise
/quit
```

```bash
python -m meet_lightning chat --model runs/x/export < session.txt
WANDB_MODE=offline python -m meet_lightning fit --config meet_hh_prompt --output_dir runs/t --logger '[csv, wandb]'
```

```python
import page_pkg.fmt  # the page's folder is on sys.path, as the working folder is for python -m
```
"""


def test_the_helper_feeds_stdin_checks_a_missing_tracker_and_forgets_what_a_page_registered(
    tmp_path, monkeypatch, shared_data, capsys
):
    import importlib.util

    from meet_lightning.data import formats

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    page = tmp_path / "page.md"
    page.write_text(PAGE_OF_HELPERS)
    work = tmp_path / "work"
    work.mkdir()
    ran = run_page(page, shared_data, work, monkeypatch, capsys)
    assert [args[0] for args in ran] == ["chat", "fit"] and not (work / "runs" / "t").exists()  # refused, one line
    assert "page_nothing" not in formats.FORMATS and "page_pkg.fmt" not in sys.modules
