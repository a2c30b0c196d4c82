"""Control tokens: one interface, several small implementations chosen from YAML by ``class_path``.

A control implementation does up to three things to a batch, and modules call all three without knowing which
implementation they hold:

1. :meth:`ControlTokens.insert` splices each row's control tokens into ``input_ids`` at the ``prefix`` or
   ``infix`` position. Learned slots are written as negative ids ``-(slot + 1)``; text controls insert real ids.
2. :meth:`ControlTokens.embed` turns ids into ``inputs_embeds``, replacing learned slots with their vectors.
3. :meth:`ControlTokens.route` is a context in which per-row weight deltas (LoRA controls) are active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from meet_lightning._moved import current_name
from meet_lightning.controls.packing import packed_logps
from meet_lightning.controls.shared_prompt import (
    PromptSharing,
    padded_tokens,
    prompt_families,
    shared_prompt_logps,
    shared_prompt_split,
)
from meet_lightning.data.rows import ControlSchema
from meet_lightning.errors import CheckpointError, ConfigError
from meet_lightning.heads import LMHead, is_checkpointed
from meet_lightning.losses import response_token_logps

PLACEMENTS = ("prefix", "infix")


@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """Every control's LoRA factors: control ``c`` adds ``(alpha / rank) · B[c] @ A[c] @ x`` to each layer.

    Attributes:
        rank: LoRA rank.
        alpha: Scaling numerator.
        target_modules: The layer-name suffixes that were adapted.
        layers: ``{module name in the LM: (A (C, r, in), B (C, out, r))}``.
    """

    rank: int
    alpha: float
    target_modules: list[str]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]


def splice(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    inserts: torch.Tensor,
    insert_lengths: torch.Tensor,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inserts ``inserts[b, :insert_lengths[b]]`` into right-padded row ``b`` before index ``positions[b]``.

    Args:
        input_ids, attention_mask, labels: (B, L) right-padded batch.
        positions: (B,) insertion index per row.
        inserts: (B, C) ids to insert (padded arbitrarily past each row's length).
        insert_lengths: (B,) how many of ``inserts`` each row takes.
        pad_id: Id written into the new padding.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` of shape (B, L + C), still right-padded; inserted tokens
        are attended to and carry no label.
    """
    batch, length = input_ids.shape
    width = inserts.shape[1]
    j = torch.arange(length + width, device=input_ids.device)[None, :]  # (1, L+C) output positions
    pos, n = positions[:, None], insert_lengths[:, None]  # (B, 1)
    in_insert = (j >= pos) & (j < pos + n)  # (B, L+C)
    src = torch.where(j < pos, j, j - n).clamp(0, length - 1)  # index into the original row
    from_row = ~in_insert & (torch.where(j < pos, j, j - n) < length)
    ins = inserts.gather(1, (j - pos).clamp(0, max(width - 1, 0)).expand(batch, -1)) if width else src
    ids = torch.where(in_insert, ins, torch.where(from_row, input_ids.gather(1, src), pad_id))
    mask = torch.where(in_insert, 1, torch.where(from_row, attention_mask.gather(1, src), 0))
    new_labels = torch.where(from_row, labels.gather(1, src), -100)
    return ids, mask, new_labels


class ControlTokens(nn.Module):
    """Interface of every control implementation.

    Subclasses define :meth:`build` (create parameters once the LM, tokenizer and schema are known) and
    :meth:`tokens_for` (ids inserted for one control); prompt-free ones (LoRA) insert nothing and override
    :meth:`route` instead.

    Args:
        placement: ``prefix`` (right after BOS, before the chat template) or ``infix`` (right after the
            assistant header, before the response).
    """

    steers = False
    """Whether this control changes what the LM computes (False only for this no-op base: the plain LM)."""

    shares_prompt = True
    """Whether the tokens before the control's insertion point are computed as by the plain LM, so that rows with
    one prompt can share a pass over it (:mod:`~meet_lightning.controls.shared_prompt`). A control that overrides
    :meth:`route` to change weights per row sets this to ``False``."""

    def __init__(self, placement: str = "prefix") -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r} is not one of {PLACEMENTS} — set init_args.placement")
        self.placement = placement
        self.schema: ControlSchema | None = None
        self.pad_id = 0

    # --------------------------------------------------------------- building
    def setup(self, model: nn.Module, tokenizer: Any, schema: ControlSchema) -> None:
        """Creates the parameters for ``schema`` on ``model``; called once by the module's ``configure_model``."""
        self.schema = schema
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.build(model, tokenizer, schema)

    def build(self, model: nn.Module, tokenizer: Any, schema: ControlSchema) -> None:
        """Creates parameters (override)."""

    def tokens_for(self, control_id: int) -> list[int]:
        """Ids inserted for one global control id (negative ids are learned slots)."""
        return []

    def init_args(self) -> dict[str, Any]:
        """Constructor arguments, so the control can be rebuilt from YAML types alone."""
        return {"placement": self.placement}

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``: the checkpoint/YAML form of this control."""
        return {"class_path": f"{type(self).__module__}.{type(self).__name__}", "init_args": self.init_args()}

    # --------------------------------------------------------------- applying
    def insert(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splices each row's control tokens in (preferences in schema order; ``-1`` inserts nothing).

        Returns:
            ``input_ids``, ``attention_mask``, ``labels``: (B, L + C).
        """
        rows = [self._row_tokens(ids) for ids in batch["control_ids"].tolist()]
        width = max((len(r) for r in rows), default=0)
        if width == 0:
            return batch["input_ids"], batch["attention_mask"], batch["labels"]
        device = batch["input_ids"].device
        inserts = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], device=device)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        positions = batch["prefix_pos" if self.placement == "prefix" else "response_start"]
        return splice(batch["input_ids"], batch["attention_mask"], batch["labels"], positions, inserts, lengths, self.pad_id)

    def _row_tokens(self, control_ids: list[int]) -> list[int]:
        return [t for c in control_ids if c >= 0 for t in self.tokens_for(c)]

    def embed(self, embedding: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` (B, L, H) for ``input_ids`` (B, L); learned slots replaced by their vectors."""
        return embedding(input_ids.clamp(min=0))

    @contextlib.contextmanager
    def route(self, control_ids: torch.Tensor) -> Iterator[None]:
        """Context in which per-row weight deltas follow ``control_ids`` (B, P). No-op by default."""
        yield

    def recompute_context(self) -> contextlib.AbstractContextManager:
        """The context a checkpointed layer is recomputed in during backward (gradient checkpointing): the
        routing active now, when the layer runs forward. No-op by default."""
        return contextlib.nullcontext()

    def input_vectors(self) -> torch.Tensor | None:
        """(C, T, H) the vectors this control inserts as input embeddings, one row per control in schema id order;
        ``None`` for controls that are not learned input vectors (the export then keeps them out of the vocabulary)."""
        return None

    def lora_weights(self) -> LoRAWeights | None:
        """The per-control weight deltas of this control, for the PEFT adapter export; ``None`` for controls that
        are not LoRA adapters."""
        return None

    def num_inserted(self, control_ids: list[int]) -> int:
        """How many tokens a row with these control ids gets."""
        return len(self._row_tokens(control_ids))


class PromptTuningControl(ControlTokens):
    """Learned embedding vectors per control (prompt tuning), spliced into ``inputs_embeds``.

    Args:
        num_tokens: Vectors per control.
        init: ``text`` (embeddings of a phrase per control, repeated or cut to ``num_tokens``; the default:
            on the length task it lifted the verbose/concise ratio from 1.11 to 1.73, docs/results/ablations.md),
            ``vocab`` (embeddings of random ordinary vocabulary tokens) or ``random`` (normal, scaled
            like the vocabulary).
        init_text: ``{control: phrase}`` or ``{"preference/control": phrase}`` for ``init: text``; a control
            without one starts from :func:`default_phrase` of its names (``concise`` → "A concise response:").
        placement: ``prefix`` or ``infix``.
        seed: Seed of the random/vocab initialisation; ``None`` (default) follows the run's
            ``seed_everything``, so runs with different seeds start from different controls.
    """

    steers = True

    def __init__(
        self,
        num_tokens: int = 20,
        init: str = "text",
        init_text: dict[str, str] | None = None,
        placement: str = "prefix",
        seed: int | None = None,
    ) -> None:
        super().__init__(placement)
        if num_tokens < 1:
            raise ValueError(f"num_tokens {num_tokens} must be ≥ 1 — set init_args.num_tokens")
        if init not in INITS:
            raise ValueError(f"init {init!r} is not one of {sorted(INITS)} — set init_args.init")
        self.num_tokens, self.init, self.init_text, self.seed = num_tokens, init, dict(init_text or {}), seed
        self.bank: nn.Parameter | None = None

    def init_args(self) -> dict[str, Any]:
        return {
            "num_tokens": self.num_tokens,
            "init": self.init,
            "init_text": self.init_text or None,
            "placement": self.placement,
            "seed": self.seed,
        }

    def build(self, model: nn.Module, tokenizer: Any, schema: ControlSchema) -> None:
        vocab = model.get_input_embeddings().weight.detach().float()  # (V, H)
        generator = torch.Generator().manual_seed(run_seed(self.seed))
        bank = INITS[self.init](self, vocab, tokenizer, schema, generator)  # (num_controls, T, H)
        self.bank = nn.Parameter(bank.to(model.get_input_embeddings().weight.dtype))

    def tokens_for(self, control_id: int) -> list[int]:
        first = control_id * self.num_tokens
        return [-(first + t) - 1 for t in range(self.num_tokens)]

    def input_vectors(self) -> torch.Tensor | None:
        return self.bank.detach()

    def embed(self, embedding: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = embedding(input_ids.clamp(min=0))  # (B, L, H)
        slots = (-input_ids - 1).clamp(min=0)  # (B, L) index into the flattened bank
        learned = self.bank.reshape(-1, self.bank.shape[-1])[slots].to(tokens.dtype)  # (B, L, H)
        return torch.where((input_ids < 0)[..., None], learned, tokens)


def _init_random(control, vocab, tokenizer, schema, generator) -> torch.Tensor:
    std = vocab.std().item()
    # Drawn on the CPU generator whatever the default device (Lightning may build on the GPU), then moved.
    return (
        torch.randn(schema.num_controls, control.num_tokens, vocab.shape[1], generator=generator, device="cpu").to(vocab.device)
        * std
    )


def run_seed(seed: int | None) -> int:
    """``seed``, or the seed the run's ``seed_everything`` gave torch when ``None``.

    ``torch.initial_seed()`` reads the seed without drawing from the global generator, so following the run's seed
    does not shift any other random number of the run.
    """
    return torch.initial_seed() % 2**63 if seed is None else seed


BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def ordinary_token_ids(tokenizer: Any, limit: int) -> list[int]:
    """Ids below ``limit`` of ordinary text tokens: no special, added or byte-fallback (``<0x0A>``) tokens.

    Special tokens (``<|im_start|>``…) carry the chat template's structure: a control started from one reads as
    a turn boundary. SmolLM2's first 17 ids are such tokens.
    """
    excluded = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    tokens = tokenizer.convert_ids_to_tokens(list(range(limit)))
    return [i for i, token in enumerate(tokens) if i not in excluded and token is not None and not BYTE_FALLBACK.match(token)]


def _init_vocab(control, vocab, tokenizer, schema, generator) -> torch.Tensor:
    # Ids from the lower part of the vocabulary: BPE vocabularies put common tokens first (Lester et al.).
    candidates = torch.tensor(ordinary_token_ids(tokenizer, min(vocab.shape[0], len(tokenizer), 5000)))
    if not len(candidates):
        raise ValueError("the tokenizer has no ordinary tokens among its first 5000 ids — use init: text or random")
    draws = torch.randint(0, len(candidates), (schema.num_controls, control.num_tokens), generator=generator, device="cpu")
    return vocab[candidates[draws].to(vocab.device)].clone()


def default_phrase(preference: str, label: str, shared: bool) -> str:
    """The ``init: text`` phrase of a control the recipe gives none for, from its names.

    ``concise`` → "A concise response:" (the Chain-of-Hindsight form); a label several preferences share names
    its preference too, so that their controls do not start equal: "A good response (harmless):".
    """
    words = label.replace("_", " ").replace("-", " ")
    return f"A {words} response ({preference.replace('_', ' ')}):" if shared else f"A {words} response:"


def _init_text(control, vocab, tokenizer, schema, generator) -> torch.Tensor:
    owners: dict[str, int] = {}
    for labels in schema.preferences.values():
        for label in labels:
            owners[label] = owners.get(label, 0) + 1
    rows = []
    for name in schema.names:
        preference, label = name.split("/", 1)
        phrase = control.init_text.get(name, control.init_text.get(label)) or default_phrase(preference, label, owners[label] > 1)
        ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        ids = (ids * math.ceil(control.num_tokens / len(ids)))[: control.num_tokens]
        rows.append(vocab[torch.tensor(ids, device=vocab.device)])
    return torch.stack(rows).clone()


INITS = {"random": _init_random, "vocab": _init_vocab, "text": _init_text}


class SpecialTokenControl(PromptTuningControl):
    """One new token per control (the special-token baseline), initialised to the mean vocabulary embedding.

    The token is an extra input embedding, not an extra output class: the model reads it but never predicts
    it, so the vocabulary and LM head stay unchanged and the export stays loadable by plain ``transformers``.

    Args:
        placement: ``prefix`` or ``infix``.
    """

    def __init__(self, placement: str = "prefix") -> None:
        super().__init__(num_tokens=1, init="vocab", placement=placement)

    def init_args(self) -> dict[str, Any]:
        return {"placement": self.placement}

    def build(self, model: nn.Module, tokenizer: Any, schema: ControlSchema) -> None:
        weight = model.get_input_embeddings().weight
        mean = weight.detach().float().mean(0)  # (H,) how new vocabulary rows are usually initialised
        self.bank = nn.Parameter(mean.expand(schema.num_controls, 1, -1).clone().to(weight.dtype))


class TextControl(ControlTokens):
    """A hand-written phrase per control, inserted as ordinary tokens (the Chain-of-Hindsight baseline).

    Args:
        phrases: ``{control: phrase}`` or ``{"preference/control": phrase}``,
            e.g. ``{"good": "A good response:", "bad": "A bad response:"}``.
        placement: ``prefix`` or ``infix``.
    """

    steers = True

    def __init__(self, phrases: dict[str, str], placement: str = "infix") -> None:
        super().__init__(placement)
        if not phrases:
            raise ValueError("TextControl needs phrases {control: phrase} — set init_args.phrases")
        self.phrases = dict(phrases)
        self._ids: list[list[int]] = []

    def init_args(self) -> dict[str, Any]:
        return {"phrases": self.phrases, "placement": self.placement}

    def build(self, model: nn.Module, tokenizer: Any, schema: ControlSchema) -> None:
        missing = [n for n in schema.names if n not in self.phrases and n.split("/", 1)[1] not in self.phrases]
        if missing:
            raise ValueError(f"TextControl has no phrase for {', '.join(missing)} — add it to init_args.phrases")
        phrase = lambda n: self.phrases.get(n, self.phrases.get(n.split("/", 1)[1]))  # noqa: E731
        # A trailing space or newline keeps the phrase a separate word from the text that follows it.
        self._ids = [tokenizer(phrase(n) + "\n", add_special_tokens=False)["input_ids"] for n in schema.names]

    def tokens_for(self, control_id: int) -> list[int]:
        return self._ids[control_id]


class LoRAControl(ControlTokens):
    """One LoRA adapter per control, applied per row: mixed batches train and generate.

    For a row, every target linear layer computes ``W x + (alpha / rank) · Σ_p B_c A_c x`` over the row's
    controls ``c`` (one per labelled preference), so a combination of preferences is the exact sum of their
    adapters. Implemented directly with forward hooks rather than through peft, because peft mixes adapters
    per row only in eval mode.

    Args:
        rank: LoRA rank.
        alpha: LoRA scaling numerator.
        target_modules: Names (suffixes) of the linear layers to adapt.
        seed: Seed of the ``A`` initialisation (``B`` starts at zero, so an untrained adapter changes nothing);
            ``None`` (default) follows the run's ``seed_everything``.
    """

    steers = True
    shares_prompt = False  # every token of a row runs through its control's adapter

    def __init__(
        self, rank: int = 8, alpha: float = 16.0, target_modules: list[str] | None = None, seed: int | None = None
    ) -> None:
        super().__init__("prefix")
        if rank < 1:
            raise ValueError(f"rank {rank} must be ≥ 1 — set init_args.rank")
        self.rank, self.alpha, self.seed = rank, alpha, seed
        self.target_modules = list(target_modules or ["q_proj", "v_proj"])
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self._active: torch.Tensor | None = None  # (B, P) control ids while routing
        self._hooks: list = []
        self._layer_names: dict[str, str] = {}  # parameter key -> module name in the LM (keys cannot hold dots)

    def init_args(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": self.target_modules, "seed": self.seed}

    def build(self, model: nn.Module, tokenizer: Any, schema: ControlSchema) -> None:
        generator = torch.Generator().manual_seed(run_seed(self.seed))
        targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in self.target_modules}
        if not targets:
            raise ValueError(f"no linear layer named {self.target_modules} in the model — set init_args.target_modules")
        output = model.get_output_embeddings()
        head = [name for name, layer in targets.items() if layer is output]
        if head:  # the head runs on response positions after the decoder, outside the routing: it would not adapt
            raise ConfigError(
                f"LoRA controls adapt the decoder's layers, not the output layer {head[0]!r} — remove"
                f" {head[0].split('.')[-1]!r} from init_args.target_modules"
            )
        for name, layer in targets.items():
            key = name.replace(".", "_")
            self._layer_names[key] = name
            a = torch.randn(schema.num_controls, self.rank, layer.in_features, generator=generator, device="cpu")
            a = a.to(layer.weight.device) / math.sqrt(layer.in_features)
            self.lora_a[key] = nn.Parameter(a.to(layer.weight.dtype))  # (C, r, in)
            self.lora_b[key] = nn.Parameter(
                torch.zeros(schema.num_controls, layer.out_features, self.rank, dtype=layer.weight.dtype)
            )
            self._hooks.append(layer.register_forward_hook(self._make_hook(key)))

    def _make_hook(self, key: str):
        def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._active is None:
                return output
            x = args[0]  # (B, T, in)
            ids = self._active  # (B, P)
            valid = (ids >= 0).to(x.dtype)[:, :, None, None]  # (B, P, 1, 1)
            a = self.lora_a[key][ids.clamp(min=0)].to(x.dtype) * valid  # (B, P, r, in)
            b = self.lora_b[key][ids.clamp(min=0)].to(x.dtype)  # (B, P, out, r)
            low = torch.einsum("bti,bpri->bptr", x, a)  # (B, P, T, r)
            return output + torch.einsum("bptr,bpor->bto", low, b) * (self.alpha / self.rank)

        return hook

    def lora_weights(self) -> LoRAWeights:
        layers = {name: (self.lora_a[key].detach(), self.lora_b[key].detach()) for key, name in self._layer_names.items()}
        found = sorted({name.split(".")[-1] for name in layers})
        return LoRAWeights(self.rank, self.alpha, [t for t in self.target_modules if t in found], layers)

    def recompute_context(self) -> contextlib.AbstractContextManager:
        return self.route(self._active) if self._active is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def route(self, control_ids: torch.Tensor) -> Iterator[None]:
        self._active = control_ids
        try:
            yield
        finally:
            self._active = None


def length_chunks(lengths: Sequence[int], max_chunks: int) -> list[list[int]]:
    """Row indices in at most ``max_chunks`` groups, cut where the fewest padding tokens remain.

    Rows sorted by length are split into contiguous groups minimising ``Σ rows(group) × longest(group)``, the
    tokens a forward pass of each group computes (an exact dynamic programme; a batch is at most a few hundred
    rows), and among the splits that compute as few, the one whose largest pass is smallest. No pass computes more
    than an even split's largest, ``⌈rows / chunks⌉ × longest``: a pass's memory is bounded by the batch's size and
    longest row alone, so a batch of ``max_length`` rows that fits bounds every batch (the memory probe,
    :mod:`~meet_lightning.training.memory_probe`). Always ``min(max_chunks, rows)`` non-empty groups, so ranks with
    equal batch sizes run equally many passes; ``max_chunks`` 1 gives one group of every row.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, k = len(order), max(1, min(max_chunks, len(order)))
    sorted_lengths = [lengths[i] for i in order]
    cap = -(-n // k) * max(sorted_lengths, default=0)  # the even split's largest pass, always within reach
    # cost[c][j]: (computed tokens, largest pass) of the best split of the j shortest rows into c groups, compared
    # in that order (exact: a split with the fewest tokens extends one with the fewest); cut[c][j]: where its
    # last group starts
    inf = (float("inf"), float("inf"))
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = (0, 0)
    for c in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(c - 1, j):
                tokens, largest = cost[c - 1][i]
                group = (j - i) * sorted_lengths[j - 1]
                if group > cap:
                    continue
                value = (tokens + group, max(largest, group))
                if value < cost[c][j]:
                    cost[c][j], cut[c][j] = value, i
    # Exactly k groups, never fewer (splitting a group never computes more): under FSDP every rank must run
    # the same number of forward passes, or the ranks' all-gathers pair up wrongly and hang.
    groups, j = [], n
    for c in range(k, 0, -1):
        groups.append(order[cut[c][j] : j])
        j = cut[c][j]
    return groups[::-1]


def controlled_response_logps(
    lm: nn.Module,
    control: ControlTokens,
    batch: Mapping[str, torch.Tensor],
    control_ids: torch.Tensor | None = None,
    fp32_head: bool = False,
    chunks: int = 1,
    share_prompt: bool = False,
    pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each row's response under its controls (or ``control_ids`` (B, P)).

    ``fp32_head`` computes the LM head and log-softmax in float32 (scoring; see :class:`~meet_lightning.heads.LMHead`).
    ``chunks`` > 1 runs the rows in up to that many forward passes of similar length (:func:`length_chunks`),
    each padded only to its own longest row: less padding computed, the same values (rows never attend to each
    other; right padding is cut, not moved). ``share_prompt``: rows that read the same prompt (and the same
    control, where it comes first) compute it once (:mod:`~meet_lightning.controls.shared_prompt`); the same values.
    ``pack``: otherwise, the rows packed end to end in one pass without padding (:mod:`~meet_lightning.controls.packing`;
    ``chunks`` is then not used), where the control allows; the same values.

    Returns:
        ``token_logps`` and ``mask``, both (B, T-1) over the spliced sequence.
    """
    controls = batch["control_ids"] if control_ids is None else control_ids
    ids, mask, labels = control.insert({**batch, "control_ids": controls})  # (B, T)
    ends = (mask.bool() * torch.arange(1, ids.shape[1] + 1, device=ids.device)).amax(-1)  # (B,) one past the last token
    sharing = _prompt_sharing(lm, control, batch, ids, mask, labels) if share_prompt else None
    if sharing is not None:
        shared = _shared_prompt_chunks(lm, control, ids, mask, labels, sharing, ends, fp32_head, chunks)
        if shared is not None:
            return shared
    if pack and control.shares_prompt:  # a control that routes weights per row (LoRA) needs a row per batch row
        packed = packed_logps(lm, functools.partial(control.embed, lm.get_input_embeddings()), ids, mask, labels, fp32_head)
        if packed is not None:
            return packed

    def full(index: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logps, picked = _response_logps(
            lm, control, ids[index, :t], mask[index, :t], labels[index, :t], controls[index], fp32_head
        )
        return logps, picked, index

    if chunks <= 1 or ids.shape[0] < 2:
        return full(torch.arange(ids.shape[0], device=ids.device), ids.shape[1])[:2]
    return _in_chunks(full, length_chunks(ends.tolist(), chunks), ends, ids.shape[0], ids.shape[1] - 1)


def _shared_prompt_chunks(
    lm, control, ids, mask, labels, sharing: PromptSharing, ends, fp32_head, chunks
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`~meet_lightning.controls.shared_prompt.shared_prompt_logps` over chunks of prompts, or ``None`` where
    that would compute more tokens than the full pass (prompts and responses varying in opposite directions)."""
    embed = functools.partial(control.embed, lm.get_input_embeddings())

    def shared(index: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, part = sharing.select(index)  # the chunk's prompts' rows
        logps, picked = shared_prompt_logps(lm, embed, ids[rows, :t], mask[rows, :t], labels[rows, :t], part, fp32_head)
        return logps, picked, rows

    longest = torch.zeros_like(sharing.heads).scatter_reduce(0, sharing.family, ends, "amax")  # (M,) a prompt's longest row
    groups = length_chunks(longest.tolist(), chunks)
    if sharing.tokens(ends, groups) >= padded_tokens(ends, length_chunks(ends.tolist(), chunks)):
        return None
    return _in_chunks(shared, groups, longest, ids.shape[0], ids.shape[1] - 1)


def _in_chunks(run, groups: list[list[int]], ends: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``run(index, t)`` for each group of ``index`` cut to its longest ``ends`` (``t``), put back in row order.

    ``run`` returns (r, t-1) log-probs and mask and the (r,) batch rows they belong to.
    """
    picked = torch.zeros(rows, width, dtype=torch.bool, device=ends.device)  # (B, T-1)
    parts, order = [], []
    for group in groups:
        index = torch.tensor(group, device=ends.device)
        part, part_mask, at = run(index, max(int(ends[index].max()), 2))  # (r, t-1) each
        parts.append(torch.nn.functional.pad(part, (0, width - part.shape[1])))
        picked[at, : part.shape[1]] = part_mask
        order.append(at)
    return torch.cat(parts)[torch.argsort(torch.cat(order))], picked  # back to the batch's row order


def _prompt_sharing(lm, control, batch, ids, mask, labels) -> PromptSharing | None:
    """Which rows can continue from one prompt pass: a paired batch's rows of one prompt where the control comes
    after it (or there is none), else rows with the same tokens up to their response (a ``prefix`` control and the
    prompt). ``None`` for controls with per-row weight deltas and in training under gradient checkpointing (whose
    layers drop the key/value cache)."""
    checkpointed = lm.training and torch.is_grad_enabled() and is_checkpointed(lm)
    if not control.shares_prompt or checkpointed:
        return None
    inserted_after = control.placement == "infix" or ids is batch["input_ids"]
    pairs = shared_prompt_split(batch, ids, mask) if inserted_after else None
    return pairs if pairs is not None else prompt_families(ids, mask, labels)


def _response_logps(lm, control, ids, mask, labels, controls, fp32_head) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = control.embed(lm.get_input_embeddings(), ids)  # (B, T, H)
    with control.route(controls):
        hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, T, H)
    return response_token_logps(hidden, labels, LMHead(lm, fp32=fp32_head))


def plain_logps(
    lm: nn.Module,
    batch: Mapping[str, torch.Tensor],
    fp32_head: bool = False,
    chunks: int = 1,
    share_prompt: bool = False,
    pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token response log-probs of every row under no control: ``token_logps`` and ``mask``, (B, T-1).

    ``fp32_head``: head and log-softmax in float32 (scoring; see :class:`~meet_lightning.heads.LMHead`);
    ``chunks``, ``share_prompt``, ``pack``: as in :func:`controlled_response_logps`.
    """
    no_controls = torch.full_like(batch["control_ids"], -1)
    return controlled_response_logps(lm, ControlTokens(), batch, no_controls, fp32_head, chunks, share_prompt, pack)


def build_control(control: ControlTokens | Mapping[str, Any] | None, *, allow_import: bool = False) -> ControlTokens:
    """A control object from an instance or its ``{"class_path", "init_args"}`` form (recipes, checkpoints, exports).

    Any subclass of :class:`ControlTokens` works, from any package: a recipe names it by its import path
    (``class_path: my_package.controls.MyControl``), and parsing the recipe imports that module. The dict form,
    which checkpoints and exports carry, resolves a class of ``meet_lightning`` or of a module that is already
    imported; it never imports another module on its own, so loading a file from elsewhere (even with
    ``weights_only=True``) cannot run code you did not name. To load a checkpoint or export of your own control in
    a fresh process, import its module first (or pass ``allow_import=True`` for a ``class_path`` you wrote).

    Args:
        control: An instance (returned as is), the dict form, or ``None`` (no control: the plain LM).
        allow_import: Import the module ``class_path`` names when it is not imported yet; only for a ``class_path``
            the user wrote (their recipe), never for one read from a file.

    Raises:
        CheckpointError: ``class_path`` names no :class:`ControlTokens` subclass, or a module not imported yet.
    """
    if control is None:
        return ControlTokens()
    if isinstance(control, ControlTokens):
        return control
    class_path = current_name(str(control.get("class_path", "")))  # files written before the modules moved
    module_name, _, class_name = class_path.rpartition(".")
    if module_name and module_name not in sys.modules and not (allow_import or _is_own_module(module_name)):
        raise CheckpointError(
            f"control class_path {class_path!r}: module {module_name!r} is not imported — import it first (import"
            f" {module_name}); controls are resolved from meet_lightning and modules already imported, so a checkpoint"
            " never makes meet_lightning import code you did not name"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name, None) if module_name else None
    except ImportError as error:
        raise CheckpointError(f"control class_path {class_path!r} cannot be imported ({error}) — check the name") from None
    if not (isinstance(cls, type) and issubclass(cls, ControlTokens)):
        raise CheckpointError(
            f"control class_path {class_path!r} is not a meet_lightning control (a subclass of ControlTokens) — use"
            " one of meet_lightning.controls.tokens's classes or a ControlTokens subclass of your own"
        )
    return cls(**(control.get("init_args") or {}))


def _is_own_module(name: str) -> bool:
    return name == "meet_lightning" or name.startswith("meet_lightning.")
