"""Rewards and judges of generated text: a Hugging Face sequence-classification model as a reward
(:class:`RewardModel`), and ``win_rate`` of responses against references under a pluggable judge (a reward-model
folder, a ``module:function`` or a callable).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from meet_lightning.data.rows import Message
from meet_lightning.errors import ConfigError
from meet_lightning.evaluation.summary import summarize

Judge = Callable[[Sequence[Message], str, str], float]
"""A judge: ``(prompt, response, reference) → 1.0`` if the response wins, ``0.5`` on a tie, ``0.0`` if it loses
(any value in between is read as the probability that it wins)."""


class RewardModel:
    """Any Hugging Face sequence-classification model as a reward: ``(prompt, response) → float``.

    The conversation is rendered with the reward model's own chat template when it has one, else as
    ``role: content`` lines. The score is the single logit (``num_labels == 1``), else the logit of the last
    label. Long conversations are cut from the left, so the response is always seen.

    Args:
        path: Folder (or hub id) of the reward model and its tokenizer.
        device: Where to run it.
        batch_size: Responses per forward pass.
        max_length: Longest input in tokens.
    """

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 8, max_length: int = 1024) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise ConfigError(f"--reward_model {path}: folder not found — pass a folder with a sequence-classification model")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"--reward_model {path}: not a sequence-classification model ({first}) — pass another folder"
            ) from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        self.path, self.batch_size, self.max_length = path, batch_size, max_length

    @property
    def name(self) -> str:
        return f"reward_model:{self.path}"

    def render(self, prompt: Sequence[Message], response: str) -> str:
        """The text the reward model reads for one conversation."""
        messages = [*prompt, {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[float]:
        """One reward per ``(prompt, response)``."""
        texts = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.model.device)
            logits = self.model(**inputs).logits.float()  # (B, num_labels)
            out += logits[:, -1].tolist()
        return out

    def __call__(self, prompt: Sequence[Message], response: str) -> float:
        return self.score([prompt], [response])[0]


class RewardModelJudge:
    """A judge from a reward model: the response wins when its reward is higher (ties half)."""

    def __init__(self, reward: RewardModel) -> None:
        self.reward = reward

    @property
    def name(self) -> str:
        return self.reward.name

    def judge_all(self, prompts, responses, references) -> list[float]:
        """Win (1), tie (0.5) or loss (0) of each response against its reference."""
        ours, theirs = self.reward.score(prompts, responses), self.reward.score(prompts, references)
        return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)]


def import_callable(spec: str, flag: str) -> Callable:
    """``package.module:function`` → the function; ConfigError naming ``flag`` otherwise."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{flag} {spec!r} is not module:function — e.g. {flag} my_judges:length_judge")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{flag} {spec}: cannot import ({error}) — check the module is on PYTHONPATH and the name") from None
    if not callable(fn):
        raise ConfigError(f"{flag} {spec} is not callable — point it at a function")
    return fn


def load_judge(spec: str | Judge, device: str = "cpu") -> tuple[str, Callable]:
    """A judge from a reward-model folder, a ``module:function`` spec or a callable; and its name.

    Returns:
        ``(name, judge_all)`` where ``judge_all(prompts, responses, references)`` gives one score per prompt.
    """
    if callable(spec):
        fn = spec
        return f"callable:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}", _judge_each(fn)
    if Path(spec).is_dir():
        judge = RewardModelJudge(RewardModel(spec, device))
        return judge.name, judge.judge_all
    return f"callable:{spec}", _judge_each(import_callable(spec, "--judge"))


def _judge_each(fn: Judge) -> Callable:
    def judge_all(prompts, responses, references) -> list[float]:
        return [float(fn(p, r, ref)) for p, r, ref in zip(prompts, responses, references, strict=True)]

    return judge_all


def win_rate(judge: str | Judge, prompts, responses, references, device: str = "cpu") -> dict[str, Any]:
    """``win_rate`` of ``responses`` over ``references`` under ``judge``, with interval and count."""
    name, judge_all = load_judge(judge, device)
    return {**summarize("win_rate", judge_all(prompts, responses, references), count="prompts"), "judge": name}
