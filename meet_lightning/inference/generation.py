"""Generation under chosen controls: batched, KV cache on, mixed controls in one batch."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from tqdm.auto import tqdm

from meet_lightning.atomic import write_text_atomic
from meet_lightning.controls.tokens import ControlTokens
from meet_lightning.data.rows import ControlSchema, Message
from meet_lightning.data.tokenization import IGNORE_INDEX, PromptTokenizer
from meet_lightning.errors import ConfigError, DataError, failed_checks

ControlSpec = str | Sequence[str] | Mapping[str, str] | None
"""``"good"``, ``"harmless/good"``, ``["harmless/good", "concise"]``, ``{"harmless": "good"}`` or ``None``."""
KVCache = Literal["dynamic", "static"]
"""The KV cache ``generate`` keeps: ``dynamic`` grows per token; ``static`` is allocated once at the batch's full
length (transformers' ``cache_implementation="static"``, what ``torch.compile`` and CUDA graphs need)."""


@dataclasses.dataclass
class DecodingOptions:
    """How responses are decoded: the ``generate`` command's flags and a recipe's ``predict`` section."""

    max_new_tokens: int = 128
    """Longest response, in tokens."""
    temperature: float = 0.0
    """0 = greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating earlier tokens (1 = off)."""
    batch_size: int = 8
    """Prompts per generate call."""
    cache: KVCache = "dynamic"
    """KV cache: ``dynamic`` or ``static`` (the same tokens; speed: docs/results/performance.md)."""
    seed: int | None = None
    """Seed of sampling (reproducible samples)."""

    def problems(self, flag: str = "--") -> list[str]:
        """Every bad option, each named ``{flag}name`` (``--`` or ``--predict.``), with its fix."""
        checks = (
            (self.max_new_tokens < 1, f"{flag}max_new_tokens {self.max_new_tokens} must be ≥ 1"),
            (self.temperature < 0, f"{flag}temperature {self.temperature} must be ≥ 0 (0 = greedy)"),
            (not 0 < self.top_p <= 1, f"{flag}top_p {self.top_p} must be in (0, 1]"),
            (self.top_k < 0, f"{flag}top_k {self.top_k} must be ≥ 0 (0 = off)"),
            (self.repetition_penalty <= 0, f"{flag}repetition_penalty {self.repetition_penalty} must be > 0 (1 = off)"),
            (self.batch_size < 1, f"{flag}batch_size {self.batch_size} must be ≥ 1"),
            (self.cache not in get_args(KVCache), f"{flag}cache {self.cache!r} must be {' or '.join(get_args(KVCache))}"),
        )
        return failed_checks(checks)


def resolve_controls(schema: ControlSchema, spec: ControlSpec) -> list[int]:
    """One global control id per preference (``-1`` = none) for a user's control choice."""
    names = [spec] if isinstance(spec, str) else list(spec.items()) if isinstance(spec, Mapping) else list(spec or [])
    chosen: dict[str, str] = {}
    for name in names:
        preference, label = name if isinstance(name, tuple) else _split_control(schema, name)
        if preference in chosen:
            raise ConfigError(
                f"two controls for preference {preference!r} — pick one of {', '.join(schema.preferences[preference])}"
            )
        chosen[preference] = label
    try:
        return schema.encode(chosen)
    except ValueError as error:
        raise ConfigError(f"{error} — known controls: {', '.join(schema.names)}") from None


def _split_control(schema: ControlSchema, name: str) -> tuple[str, str]:
    if "/" in name:
        preference, label = name.split("/", 1)
        return preference, label
    owners = [p for p, labels in schema.preferences.items() if name in labels]
    if len(owners) != 1:
        problem = "is ambiguous" if owners else "is unknown"
        raise ConfigError(f"control {name!r} {problem} — known controls: {', '.join(schema.names)}")
    return owners[0], name


def prompt_batch(
    encoder: PromptTokenizer, prompts: Sequence[Sequence[Message]], control_ids: Sequence[Sequence[int]], max_prompt_tokens: int
) -> dict[str, torch.Tensor]:
    """A right-padded prompt-only batch in the training layout (controls not yet inserted)."""
    rows = [encoder.fit_prompt(p, max_prompt_tokens) or encoder.render_prompt(p)[-max_prompt_tokens:] for p in prompts]
    length = max(len(r) for r in rows)
    pad = encoder.tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.full((len(rows), length), IGNORE_INDEX),
        "prefix_pos": torch.tensor([encoder.prefix_pos(r) for r in rows]),
        "response_start": torch.tensor([len(r) for r in rows]),
        "control_ids": torch.tensor([list(c) for c in control_ids], dtype=torch.long).reshape(len(rows), -1),
    }


def to_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves each row's padding from the right to the left, as generation needs. (B, L) each."""
    shifts = (mask.shape[1] - mask.sum(1)).tolist()
    rolled = [(torch.roll(i, s), torch.roll(m, s)) for i, m, s in zip(ids, mask, shifts, strict=True)]
    return torch.stack([i for i, _ in rolled]), torch.stack([m for _, m in rolled])


@torch.no_grad()
def generate_responses(
    lm: torch.nn.Module,
    tokenizer: Any,
    control: ControlTokens,
    prompts: Sequence[Sequence[Message]],
    control_ids: Sequence[Sequence[int]],
    options: DecodingOptions | None = None,
    max_prompt_tokens: int = 1024,
    progress: bool = False,
    streamer: Any = None,
) -> list[str]:
    """Responses for ``prompts``, row ``i`` under ``control_ids[i]``, decoded as ``options`` (default:
    :class:`DecodingOptions`; its ``seed`` is the caller's to apply, once). ``progress`` draws a bar over batches
    on stderr; ``streamer``: a transformers streamer (``put``/``end``) that receives the new tokens as they are
    generated (for ``batch_size`` 1)."""
    o = options or DecodingOptions()
    encoder = PromptTokenizer(tokenizer, max_prompt_tokens)
    device = next(lm.parameters()).device
    stop = sorted({encoder.eot_id, tokenizer.eos_token_id} - {None})
    sampling = (
        {"do_sample": True, "temperature": o.temperature, "top_p": o.top_p if o.top_p < 1 else None, "top_k": o.top_k or None}
        if o.temperature > 0
        else {"do_sample": False, "top_p": None, "top_k": None}
    )
    texts: list[str] = []
    starts = range(0, len(prompts), o.batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress or len(starts) < 2, file=sys.stderr):
        batch = prompt_batch(
            encoder, prompts[start : start + o.batch_size], control_ids[start : start + o.batch_size], max_prompt_tokens
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        ids, mask, _ = control.insert(batch)
        ids, mask = to_left_padding(ids, mask)
        embeds = control.embed(lm.get_input_embeddings(), ids)
        with control.route(batch["control_ids"]), warnings.catch_warnings():
            # transformers warns that with inputs_embeds the penalty sees only new tokens: that is intended here
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds.*")
            out = lm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=o.max_new_tokens,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=o.repetition_penalty,
                cache_implementation=None if o.cache == "dynamic" else o.cache,
                streamer=streamer,
                **sampling,
            )
        texts += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
    return texts


def as_messages(prompt: str | Sequence[Mapping[str, str]], where: str) -> list[Message]:
    """A prompt given as text or as chat messages, as chat messages."""
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in prompt):
        return [dict(m) for m in prompt]
    raise DataError(f"{where}: 'prompt' must be non-empty text or a list of {{role, content}} messages — fix the row")


def read_prompt_file(
    path: Path, flag: str, fields: Sequence[str] = ("controls",), plain_text: bool = False
) -> list[dict[str, Any]]:
    """The rows of a prompts file, ``{"prompt": messages, "row": N, FIELD: value or None, …}``.

    JSONL with a ``prompt`` (text or ``{role, content}`` messages) and the optional ``fields`` per line; with
    ``plain_text``, a file not ending in ``.jsonl``/``.json`` is one plain-text prompt per non-empty line. Every
    problem is a DataError naming ``FILE:ROW`` and ``flag`` (the command's flag for the file).
    """
    wanted = ", ".join(['"prompt": ...', *(f'"{f}": ...' for f in fields)])
    if plain_text and path.is_file() and path.suffix not in (".jsonl", ".json"):
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
        rows = [{"prompt": as_messages(text, f"{path}:{n}"), "row": n, **dict.fromkeys(fields)} for n, text in lines if text]
        if not rows:
            raise DataError(f"{path}: no prompts in the file — write one prompt per line (or JSONL with 'prompt')")
        return rows
    if not path.is_file():
        raise DataError(f"{path}: {flag} file not found — pass a JSONL file with one {{{wanted}}} per line")
    rows = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(f"{path}:{number}: not a JSON object — write one object per line") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise DataError(f"{path}:{number}: missing field 'prompt' — each line needs {{{wanted}}}")
        prompt = as_messages(record["prompt"], f"{path}:{number}")
        rows.append({"prompt": prompt, "row": number, **{f: record.get(f) for f in fields}})
    if not rows:
        raise DataError(f"{path}: no prompts in the file — add JSONL lines with a 'prompt' field")
    return rows


def write_jsonl_atomic(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes JSONL atomically (:func:`~meet_lightning.atomic.write_atomic`): a crash leaves no half file."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def row_controls(schema: ControlSchema, row: Mapping[str, Any], path: str) -> list[int]:
    """The control ids of one predict row; a ConfigError names the file and row."""
    controls = row["controls"]
    valid = controls is None or isinstance(controls, (str, Mapping)) or isinstance(controls, list)
    if not valid or (isinstance(controls, list) and not all(isinstance(c, str) for c in controls)):
        raise DataError(
            f"{path}:{row['row']}: 'controls' must be a name, a list of names or {{preference: control}} — fix the row"
        )
    try:
        return resolve_controls(schema, controls)
    except ConfigError as error:
        raise DataError(f"{path}:{row['row']}: {error}") from None
