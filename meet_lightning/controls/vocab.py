"""Prompt-tuning controls as vocabulary: an export that plain ``transformers`` steers, without this library.

Each control's learned vectors become added special tokens (``<|length/concise:0|>`` …) whose input-embedding
rows hold the vectors, and the chat template writes them where training spliced them in — ``prefix``: first
(after the BOS a template writes itself), ``infix``: right after the assistant header — from the template
variable ``controls``, a list of the names ``generate --control`` accepts::

    tokenizer.apply_chat_template(messages, controls=["concise"], add_generation_prompt=True)

Several preferences are written in schema order, as in training; without ``controls`` the prompt is the plain
one. ``generation_config.eos_token_id`` stops at the end of the turn.

Servers that pass no template variables (llama.cpp's, llama-cpp-python's, any OpenAI-compatible endpoint) take the
controls from a **directive**: a first system message whose text is ``controls: NAME, NAME…`` (``controls: none``
for none). The template reads the names from it and drops the message, so the prompt is the one training saw; the
``controls`` variable, where given, wins (vLLM: ``chat_template_kwargs={"controls": [...]}``).
:func:`split_directive` is the same rule in Python, for this library's own server::

    [{"role": "system", "content": "controls: concise"}, {"role": "user", "content": "Name a planet."}]

The added tokens are never generated, by any engine, with or without ``suppress_tokens``: a tied head is
untied (its own weight, a copy of the embeddings), so the learned input vectors are not output rows, and each
control token's output row is the mean of the real rows, whose logit never beats the top real one
(:func:`losing_output_rows`). ``generation_config.suppress_tokens`` lists them as well, which costs nothing.

Control names reach the template as data (one JSON literal it reads, :func:`jinja_literal`), never as template
code: a quote, a brace or an emoji in a name cannot break the template or add code to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from meet_lightning.data.rows import ControlSchema
from meet_lightning.errors import ConfigError

BOS_EXPRESSION = re.compile(r"\{\{-?\s*bos_token\s*-?\}\}")
DIRECTIVE = "controls:"
"""A first system message starting with this chooses the controls (see the module docstring)."""


def control_token(name: str, index: int) -> str:
    """The added token for vector ``index`` of control ``name`` (``preference/label``)."""
    return f"<|{name}:{index}|>"


def control_strings(schema: ControlSchema, num_tokens: int) -> dict[str, dict[str, str]]:
    """``{preference: {name: tokens}}`` with every full name and each short name that only one preference has."""
    owners: dict[str, list[str]] = {}
    for preference, labels in schema.preferences.items():
        for label in labels:
            owners.setdefault(label, []).append(preference)
    table: dict[str, dict[str, str]] = {}
    for preference, labels in schema.preferences.items():
        for label in labels:
            full = f"{preference}/{label}"
            tokens = "".join(control_token(full, t) for t in range(num_tokens))
            table.setdefault(preference, {})[full] = tokens
            if len(owners[label]) == 1:
                table[preference][label] = tokens
    return table


def jinja_literal(value: Any) -> str:
    """``value`` (lists, dicts, strings, numbers) as a Jinja literal that reads back exactly ``value``.

    JSON is Jinja literal syntax, and a string literal cannot end early: inside it quotes and backslashes are
    escaped, and ``{{``, ``{%`` or ``%}`` are just characters (the lexer takes a quoted string whole).
    ``ensure_ascii=False`` keeps non-ASCII text as it is: Jinja decodes a literal's escapes one code unit at a
    time, so JSON's ``\\ud83d\\ude42`` (an emoji as a surrogate pair) would come back as two broken halves.
    """
    return json.dumps(value, ensure_ascii=False)


def controlled_template(template: str, schema: ControlSchema, num_tokens: int, placement: str, bos_first: bool) -> str:
    """``template`` that also writes the tokens of the ``controls`` variable where training inserted them.

    Raises:
        ConfigError: ``prefix`` placement after a BOS the template writes in a way this cannot find.
    """
    table = control_strings(schema, num_tokens)
    known = sorted({name for names in table.values() for name in names})
    data = {"known": known, "order": list(schema.preferences), "table": table}
    # Names are data, never template code: one literal the template reads (see jinja_literal), and the error
    # message joins the names at render time. No whitespace between our tags and the original text: the template
    # environment trims blocks.
    macro = (
        "{%- macro meet_controls(active) -%}{%- if active -%}"
        f"{{%- set meet = {jinja_literal(data)} -%}}"
        "{%- for name in active -%}{%- if name not in meet['known'] -%}"
        "{{- raise_exception('unknown control ' ~ name ~ ' — known: ' ~ meet['known'] | join(', ')) -}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- for preference in meet['order'] -%}"
        "{%- for name in active -%}{%- if name in meet['table'][preference] -%}"
        "{{- meet['table'][preference][name] -}}{%- endif -%}"
        "{%- endfor -%}{%- endfor -%}{%- endif -%}{%- endmacro %}"
        # the directive (split_directive's rule): read, then dropped so the original template never sees it
        "{%- set meet_active = controls if controls is defined and controls else [] -%}"
        "{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] is string"
        f" and messages[0]['content'].strip().startswith({jinja_literal(DIRECTIVE)}) -%}}"
        "{%- if not meet_active -%}"
        f"{{%- set meet_active = messages[0]['content'].strip()[{len(DIRECTIVE)}:].split(',') | map('trim')"
        " | reject('equalto', '') | reject('equalto', 'none') | list -%}"
        "{%- endif -%}{%- set messages = messages[1:] -%}{%- endif -%}"
    )
    if placement == "infix":
        return macro + template + "{% if add_generation_prompt %}{{ meet_controls(meet_active) }}{% endif %}"
    if not bos_first:
        return macro + "{{ meet_controls(meet_active) }}" + template
    match = BOS_EXPRESSION.search(template)
    if match is None:
        raise ConfigError("the chat template writes its BOS token in a way the export cannot place prefix controls after")
    return macro + template[: match.end()] + "{{ meet_controls(meet_active) }}" + template[match.end() :]


def split_directive(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str] | None]:
    """``messages`` without a leading ``controls: …`` system message, and the names it gives (``None``: no directive).

    The same rule as the exported template's: the first message, a system message whose text starts with
    ``controls:``; names separated by commas; ``none`` (or nothing) means no control.
    """
    first = messages[0] if messages else None
    content = first.get("content") if first is not None and first.get("role") == "system" else None
    if not isinstance(content, str) or not content.strip().startswith(DIRECTIVE):
        return list(messages), None
    names = [name.strip() for name in content.strip()[len(DIRECTIVE) :].split(",")]
    return list(messages[1:]), [name for name in names if name and name != "none"]


def add_control_vocabulary(
    lm: nn.Module, tokenizer: Any, vectors: torch.Tensor, schema: ControlSchema, placement: str, bos_first: bool
) -> list[int]:
    """Adds the control tokens to ``tokenizer`` and ``lm`` (in place) and returns their ids.

    A tied output head is untied, and the control tokens get output rows that never win
    (:func:`losing_output_rows`): no engine generates them, ``suppress_tokens`` or not.

    Args:
        lm: The LM to export.
        tokenizer: Its tokenizer (its chat template is extended, see :func:`controlled_template`).
        vectors: (C, T, H) the learned vectors, one row per control in schema id order.
        schema: The run's preferences and controls.
        placement: ``prefix`` or ``infix``.
        bos_first: Whether the template writes a BOS token first (prefix controls follow it).
    """
    num_controls, num_tokens, hidden = vectors.shape
    names = [control_token(name, t) for name in schema.names for t in range(num_tokens)]
    clashes = [n for n in names if n in tokenizer.get_vocab()]
    if clashes:
        raise ConfigError(f"the tokenizer already has {clashes[0]} — export from the base model's tokenizer")
    tokenizer.add_tokens(names, special_tokens=True)  # matched whole before BPE, skipped by decode(skip_special_tokens)
    ids = tokenizer.convert_tokens_to_ids(names)
    rows = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(max(rows, max(ids) + 1), mean_resizing=False)
    untie_output_embeddings(lm)
    embedding = lm.get_input_embeddings().weight
    with torch.no_grad():
        embedding[ids] = vectors.reshape(num_controls * num_tokens, hidden).to(embedding.dtype)
    losing_output_rows(lm, ids)
    config = lm.generation_config
    config.suppress_tokens = sorted({*(config.suppress_tokens or []), *ids})
    tokenizer.chat_template = controlled_template(tokenizer.chat_template, schema, num_tokens, placement, bos_first)
    return ids


def untie_output_embeddings(lm: nn.Module) -> bool:
    """Gives a tied LM head its own weight, a copy of the input embeddings, and marks the config untied (in place).

    Tied, a control token's input vector is also its output row, and a trained vector's logit can beat every
    real token. Returns whether the head was tied.
    """
    head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if tied:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    # both configs: a multimodal model keeps the flag in its text config, and from_pretrained would tie again
    for config in {id(c): c for c in (lm.config, lm.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def losing_output_rows(lm: nn.Module, ids: list[int]) -> None:
    """Gives the control tokens ``ids`` output rows that no decoding picks (in place; the head must be untied).

    Each row is the mean of the real tokens' rows (and bias), so for every hidden state ``h`` a control token's
    logit is the mean of the real logits: never above the largest, whatever the model, the text or the control
    vectors. Greedy decoding never picks one, and by Jensen's inequality its probability stays below ``1/V``
    (``V`` real tokens) at any temperature; in LMs, whose next-token distribution is peaked, the mean logit sits
    far below the top one. No calibration text is needed, and the real tokens' logits are untouched.
    """
    head = lm.get_output_embeddings()
    real = torch.ones(head.weight.shape[0], dtype=torch.bool, device=head.weight.device)
    real[ids] = False
    for param in (head.weight, getattr(head, "bias", None)):
        if param is not None:
            param[ids] = param[real].mean(0, dtype=torch.float32).to(param.dtype)
