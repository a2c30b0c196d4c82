"""How far one optimizer step moved a group of parameters, measured cheaply enough to log every step.

``relative update = ‖θ_after − θ_before‖ / ‖θ_before‖`` over a group. An inert stage (a learning rate too small
to matter, controls that no longer move) shows as a ratio near zero. A tensor of more than ``per_tensor``
entries is measured on a fixed random subset of them, so a 7B LM costs a few kilobytes per step instead of a
copy of its weights; small tensors (control tokens) are measured whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class UpdateProbe:
    """Remembers a sample of each group's values before a step; :meth:`ratios` compares after it.

    Args:
        groups: ``{name: parameters}``, e.g. ``{"controls": [...], "lm": [...]}``.
        per_tensor: Entries sampled from each larger tensor (fixed indices, so before and after match).
    """

    def __init__(self, groups: Mapping[str, Sequence[torch.nn.Parameter]], per_tensor: int = 4096) -> None:
        self.groups = {name: list(params) for name, params in groups.items() if params}
        self.per_tensor = per_tensor
        self._indices: dict[int, torch.Tensor | None] = {}
        self._before: dict[str, list[torch.Tensor]] = {}

    def _sample(self, param: torch.Tensor) -> torch.Tensor:
        flat = param.detach().reshape(-1)
        if id(param) not in self._indices:
            chosen = None
            if flat.numel() > self.per_tensor:
                generator = torch.Generator().manual_seed(len(self._indices))  # fixed per tensor, not the global RNG
                chosen = torch.randperm(flat.numel(), generator=generator)[: self.per_tensor].to(flat.device)
            self._indices[id(param)] = chosen
        chosen = self._indices[id(param)]
        return (flat if chosen is None else flat[chosen]).float().clone()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Call right before ``optimizer.step()``."""
        self._before = {name: [self._sample(p) for p in params] for name, params in self.groups.items()}

    @torch.no_grad()
    def ratios(self) -> dict[str, float]:
        """``{group: relative update}`` since the last :meth:`snapshot` (empty if none was taken)."""
        out: dict[str, float] = {}
        for name, before in self._before.items():
            after = [self._sample(p) for p in self.groups[name]]
            # summed on the device, read once per group: one float() per tensor would wait on a GPU ~300 times a step
            moved = float(torch.stack([(a - b).square().sum() for a, b in zip(after, before, strict=True)]).sum())
            size = float(torch.stack([b.square().sum() for b in before]).sum())
            out[name] = (moved / size) ** 0.5 if size > 0 else float("nan")
        self._before = {}
        return out
