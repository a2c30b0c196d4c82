"""``python -m meet_lightning playground --model DIR``: one prompt, answered side by side under several control choices.

A local web page (Gradio, the optional ``ui`` extra): type a prompt, tick the control combinations to compare
(``none``, each control, and each combination across preferences), and see every answer in its own column with
its word count. The page's function is also an API (``/compare``), so a script or ``gradio_client`` gets the same
answers as JSON. The answers are those of :meth:`~meet_lightning.inference.export.AlignedModel.generate` with the
command's decoding flags; with sampling, ``--seed`` makes each column reproducible.
"""

from __future__ import annotations

import html
import itertools
from typing import Any

import gradio as gr
import torch

from meet_lightning.inference.export import AlignedModel
from meet_lightning.inference.generation import DecodingOptions

NONE = "none"
MAX_COMBINATIONS = 32
"""Offered combinations at most (every control alone is always offered)."""


def combinations(model: AlignedModel) -> list[str]:
    """``none``, each control alone, then each choice of one control per preference (``a + b``), as offered."""
    singles = model.controls
    choices = [[None, *(f"{p}/{label}" for label in labels)] for p, labels in model.schema.preferences.items()]
    several = [" + ".join(n for n in combo if n) for combo in itertools.product(*choices)]
    extra = [c for c in several if " + " in c][: max(0, MAX_COMBINATIONS - 1 - len(singles))]
    return [NONE, *singles, *extra]


def compare(model: AlignedModel, prompt: str, chosen: list[str], decoding: DecodingOptions) -> list[dict[str, Any]]:
    """One answer per combination in ``chosen`` (names as :func:`combinations` spells them), with its word count."""
    rows = []
    for combination in chosen:
        controls = [] if combination == NONE else combination.split(" + ")
        if decoding.seed is not None:  # each column as if generated alone: reproducible and independent of the others
            torch.manual_seed(decoding.seed)
        (answer,) = model.generate([prompt], control=controls or None, options=decoding, batch_size=1)
        rows.append({"controls": combination, "words": len(answer.split()), "answer": answer})
    return rows


def columns_html(rows: list[dict[str, Any]]) -> str:
    """The answers side by side: one column per combination, its word count under the name (text escaped)."""
    cells = "".join(
        '<div style="flex:1;min-width:14em;border:1px solid #ccc;border-radius:6px;padding:0.6em">'
        f"<b>{html.escape(row['controls'])}</b> <i>({row['words']} words)</i>"
        f'<p style="white-space:pre-wrap">{html.escape(row["answer"])}</p></div>'
        for row in rows
    )
    return f'<div style="display:flex;gap:0.8em;flex-wrap:wrap">{cells}</div>'


def build_app(model: AlignedModel, decoding: DecodingOptions, title: str) -> gr.Blocks:
    """The page: prompt, combinations to compare, a button; answers side by side and as JSON (API ``/compare``)."""
    offered = combinations(model)
    default = offered if len(offered) <= 3 else [NONE, *model.controls[:2]]
    with gr.Blocks(title=f"meet_lightning playground: {title}", analytics_enabled=False) as app:
        gr.Markdown(f"### {html.escape(title)}\nOne prompt, answered under each chosen control combination.")
        prompt = gr.Textbox(label="prompt", lines=3, placeholder="Ask something…")
        chosen = gr.CheckboxGroup(offered, value=default, label="control combinations (one column each)")
        button = gr.Button("answer", variant="primary")
        side_by_side = gr.HTML()
        table = gr.JSON(label="answers")

        def answer(text: str, picked: list[str]) -> tuple[str, list[dict[str, Any]]]:
            if not text.strip():
                raise gr.Error("type a prompt first")
            if not picked:
                raise gr.Error("tick at least one control combination")
            rows = compare(model, text, picked, decoding)
            return columns_html(rows), rows

        button.click(answer, [prompt, chosen], [side_by_side, table], api_name="compare")
    return app
