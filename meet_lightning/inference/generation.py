"""Generation under chosen controls: batched, KV cache on, mixed controls in one batch."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from meet_lightning.atomic import write_text_atomic
from meet_lightning.controls.tokens import ControlTokens
from meet_lightning.data.rows import ControlSchema, Message
from meet_lightning.data.tokenization import IGNORE_INDEX, PromptTokenizer
from meet_lightning.errors import ConfigError, DataError, failed_checks
from meet_lightning.models import cache_keyword

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
    own_loop = streamer is None and o.cache == "dynamic" and reproduces_generation_config(lm)
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
        if own_loop:
            route = lambda rows, c=batch["control_ids"]: control.route(c[rows])  # noqa: E731
            out = decode_dropping_finished(lm, embeds, mask, decoding_processors(lm, o), stop, o, route)
            texts += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
            continue
        with control.route(batch["control_ids"]):
            out = lm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=o.max_new_tokens,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=1.0,  # its own would skip padded rows' first tokens: the penalty comes next
                logits_processor=LogitsProcessorList(repetition_penalty(o)),
                cache_implementation=None if o.cache == "dynamic" else o.cache,
                streamer=streamer,
                **sampling,
            )
        texts += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
    return texts


# generation-config fields the own decoding loop reproduces (or that change nothing there); any other field set on
# the LM's generation config sends decoding to ``lm.generate``, which knows every field
_REPRODUCED_FIELDS = frozenset(
    {
        "bos_token_id", "eos_token_id", "pad_token_id", "suppress_tokens", "max_length", "max_new_tokens",
        "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",  # DecodingOptions overrides these
        "use_cache", "output_attentions", "output_hidden_states", "_from_model_config", "transformers_version",
    }
)  # fmt: skip


def reproduces_generation_config(lm: torch.nn.Module) -> bool:
    """Whether :func:`decode_dropping_finished` decodes ``lm`` as ``lm.generate`` would: its generation config sets
    nothing beyond the fields that loop applies, and keeps the KV cache on (transformers 5 or later)."""
    config = lm.generation_config
    recent = int(transformers.__version__.split(".")[0]) >= 5  # DynamicCache(config=…) knows every layer's kind
    return recent and config.use_cache is not False and set(config.to_diff_dict()) <= _REPRODUCED_FIELDS


def repetition_penalty(o: DecodingOptions) -> list[LogitsProcessor]:
    """The penalty over every new token of a row (the prompt is input vectors, not ids, so it is not penalised).

    Not ``lm.generate(inputs_embeds=…, repetition_penalty=…)``'s own: that one skips as many of a row's first new
    tokens as the row has left padding (it counts the padding as prompt ids, which its ids do not hold), so a short
    prompt batched beside a long one was decoded for its first hundreds of tokens without the penalty, and a row's
    answer depended on the other prompts of its batch.
    """
    return [RepetitionPenaltyLogitsProcessor(o.repetition_penalty)] if o.repetition_penalty != 1.0 else []


def decoding_processors(lm: torch.nn.Module, o: DecodingOptions) -> LogitsProcessorList:
    """The logits processors :func:`generate_responses` has ``lm.generate`` apply for ``o``, in its order: the
    repetition penalty (:func:`repetition_penalty`), the LM's suppressed tokens, then (sampling) temperature, top-k
    and top-p. Suppressing and penalising commute (a suppressed logit stays −inf)."""
    device = next(lm.parameters()).device
    processors = LogitsProcessorList(repetition_penalty(o))
    if lm.generation_config.suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(lm.generation_config.suppress_tokens, device=device))
    if o.temperature > 0:
        processors += [TemperatureLogitsWarper(o.temperature)] if o.temperature != 1.0 else []
        processors += [TopKLogitsWarper(o.top_k)] if o.top_k else []
        processors += [TopPLogitsWarper(o.top_p)] if o.top_p < 1 else []
    return processors


@torch.no_grad()
def decode_dropping_finished(
    lm: torch.nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    processors: LogitsProcessorList,
    stop: Sequence[int],
    o: DecodingOptions,
    route: Callable[[torch.Tensor], contextlib.AbstractContextManager[None]] = lambda rows: contextlib.nullcontext(),
) -> list[list[int]]:
    """Each row's new token ids (its stop id included, as ``lm.generate`` returns them), decoded as ``lm.generate``
    decodes, except that a row leaves the batch and the KV cache as soon as it stops: a batch costs the sum of its
    answers' lengths, not its rows × its longest answer. ``lm.generate`` keeps computing finished rows until the
    last one stops, and one looping answer at the length cap made every other row of its batch run to the cap too.

    Args:
        lm: A causal LM that takes ``inputs_embeds``.
        embeds: (B, L, H) the prompts' input vectors, left padded.
        mask: (B, L) their attention mask.
        processors: Applied to each step's logits (:func:`decoding_processors`); they see only the new tokens,
            as in ``lm.generate(inputs_embeds=…)``.
        stop: Ids that end an answer.
        o: ``max_new_tokens`` and ``temperature`` (0: greedy, else sampled).
        route: The context a forward pass runs in, given the original indices (A,) of the rows still decoding
            (per-row controls such as LoRA's route by it).
    """
    rows = torch.arange(len(embeds), device=embeds.device)  # (A,) original index of each row still decoding
    answers: list[list[int]] = [[] for _ in range(len(embeds))]
    new = torch.zeros((len(embeds), 0), dtype=torch.long, device=embeds.device)  # (A, t) tokens so far
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate derives from a left-padded mask
    stop_ids = torch.tensor(list(stop), dtype=torch.long, device=embeds.device)
    cache = DynamicCache(config=lm.config)
    # the names the model's own forward takes (a PEFT wrapper passes them on): transformers renamed
    # ``past_key_values`` to ``cache``; ``logits_to_keep=1`` spares the prompt's logits over the whole vocabulary
    wrapped = getattr(lm, "get_base_model", lambda: lm)()
    parameters = inspect.signature(wrapped.forward).parameters
    step = {cache_keyword(wrapped.forward): cache, "use_cache": True}
    step |= {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds}
    for _ in range(o.max_new_tokens):
        with route(rows):
            out = lm(**inputs, attention_mask=mask, position_ids=positions, **step)
        scores = processors(new, out.logits[:, -1].float())  # (A, V)
        token = torch.multinomial(scores.softmax(-1), 1).squeeze(1) if o.temperature > 0 else scores.argmax(-1)  # (A,)
        for row, t in zip(rows.tolist(), token.tolist(), strict=True):
            answers[row].append(t)
        going = ~torch.isin(token, stop_ids)  # (A,)
        if not going.any():
            break
        new = torch.cat([new, token[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        positions = positions[:, -1:] + 1
        if not going.all():  # stopped rows leave the batch and the cache; no copies while every row goes on
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, token, new, mask, positions = rows[keep], token[keep], new[keep], mask[keep], positions[keep]
        inputs = {"input_ids": token[:, None]}
    return answers


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
