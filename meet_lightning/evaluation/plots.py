"""PNG plots of a control-fidelity result (``evaluate --plots DIR``); needs the ``plots`` extra (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meet_lightning.evaluation.figures import require_matplotlib
from meet_lightning.stats import words


def write_plots(fidelity: Mapping[str, Any], folder: Path) -> list[Path]:
    """Writes ``fidelity_bars.png``, ``length_histograms.png`` and ``reward_vs_kl.png`` (when a KL was measured).

    Args:
        fidelity: The result of :func:`meet_lightning.evaluation.fidelity.control_fidelity`.
        folder: Created if missing.

    Returns:
        The files written.
    """
    plt = require_matplotlib()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _fidelity_bars(plt, fidelity, folder / "fidelity_bars.png"),
        _length_histograms(plt, fidelity, folder / "length_histograms.png"),
    ]
    if fidelity.get("kl_to_base"):
        written.append(_reward_vs_kl(plt, fidelity, folder / "reward_vs_kl.png"))
    return written


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _fidelity_bars(plt: Any, fidelity: Mapping[str, Any], path: Path) -> Path:
    """One panel per attribute (their scales differ), one bar per control with its 95 % interval."""
    controls, attributes = fidelity["controls"], fidelity["attributes"]
    figure, axes = plt.subplots(1, len(attributes), figsize=(1.5 + 1.2 * len(controls) * len(attributes), 3.5), squeeze=False)
    for axis, attribute in zip(axes[0], attributes, strict=True):
        means = [fidelity["matrix"][c][attribute] for c in controls]
        # no interval below 20 prompts (None): a bar without error bar
        intervals = [fidelity["matrix_ci95"][c][attribute] or (m, m) for c, m in zip(controls, means, strict=True)]
        errors = [
            [m - lo for m, (lo, _) in zip(means, intervals, strict=True)],
            [hi - m for m, (_, hi) in zip(means, intervals, strict=True)],
        ]
        axis.bar(range(len(controls)), means, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(controls))])
        axis.set_xticks(range(len(controls)), controls, rotation=30, ha="right")
        axis.set_title(attribute)
    figure.suptitle(f"control fidelity ({fidelity['prompts']} prompts)")
    return _save(plt, figure, path)


def _length_histograms(plt: Any, fidelity: Mapping[str, Any], path: Path) -> Path:
    """Response length (words) per control, overlaid."""
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for i, control in enumerate(fidelity["controls"]):
        lengths = [words(r) for r in fidelity["samples"][control]]
        axis.hist(lengths, bins=min(20, max(len(set(lengths)), 1)), alpha=0.5, label=control, color=f"C{i}")
    axis.set_xlabel("words per response")
    axis.set_ylabel("responses")
    axis.legend()
    return _save(plt, figure, path)


def _reward_vs_kl(plt: Any, fidelity: Mapping[str, Any], path: Path) -> Path:
    """Each control as a point: KL to the base (x) against the reward, or the first attribute without one (y)."""
    attribute = "reward" if "reward" in fidelity["attributes"] else fidelity["attributes"][0]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for i, control in enumerate(fidelity["controls"]):
        x, y = fidelity["kl_to_base"][control], fidelity["matrix"][control][attribute]
        axis.scatter([x], [y], color=f"C{i}", label=control)
        axis.annotate(control, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel("KL to base (nats per token)")
    axis.set_ylabel(attribute)
    axis.legend()
    return _save(plt, figure, path)
