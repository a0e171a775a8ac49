"""The report's figures as PNG bytes (matplotlib, no pyplot: a bare Figure renders with Agg and leaves
matplotlib's global backend alone)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from dust.report.predictions import SlicePrediction
from dust.report.run import RunRecord, SampleUncertainty

_DPI = 72
_ALPHA = 0.45  # label overlays: the anatomy must stay visible under the colours


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _label_colormap(num_classes: int) -> ListedColormap:
    """Class k > 0 gets tab10 colour k-1 (the colours of DUST's pseudo-label figures); class 0 is masked."""
    return ListedColormap(colormaps["tab10"].colors[: max(num_classes - 1, 1)])


def _show_labels(ax, image: np.ndarray, label: np.ndarray | None, num_classes: int, title: str,
                 fontsize: int = 8) -> None:
    ax.imshow(image, cmap="gray", interpolation="nearest")
    if label is not None:
        ax.imshow(np.ma.masked_equal(label, 0), cmap=_label_colormap(num_classes), vmin=1,
                  vmax=max(num_classes - 1, 1), alpha=_ALPHA, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize)
    ax.set_axis_off()


def _show_uncertainty(ax, pred: SlicePrediction, title: str = "") -> None:
    # scaled per panel; the range goes in the title (colour bars cost more space than the maps)
    ax.imshow(pred.uncertainty, cmap="magma", vmin=0, interpolation="nearest")
    ax.set_title(f"{title}{pred.uncertainty_name}\n0 .. {float(pred.uncertainty.max()):.3g}", fontsize=8)
    ax.set_axis_off()


def _stage_lines(ax, run: RunRecord) -> None:
    for name, begin in run.stage_starts[1:]:
        ax.axvline(begin, color="0.5", linestyle="--", linewidth=0.8)
        ax.text(begin, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="0.3")


def training_curves(run: RunRecord) -> bytes:
    """Loss terms per log window and validation Dice per check, stage boundaries dashed."""
    fig = Figure(figsize=(10, 3.2))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.88, wspace=0.22)
    ax_loss, ax_dice = fig.subplots(1, 2)
    terms = list(dict.fromkeys(k for row in run.train_log for k in row if k != "iteration"))
    for term in terms:
        points = [(row["iteration"], row[term]) for row in run.train_log if term in row]
        ax_loss.plot(*zip(*points, strict=True), label=term, linewidth=1.5 if term == "loss" else 1.0)
    ax_loss.set(xlabel="iteration", ylabel="loss (mean per log window)", title="training loss")
    if terms:
        ax_loss.legend(fontsize=7)
    if run.history:
        its = [h["iteration"] for h in run.history]
        ax_dice.plot(its, [100 * h["dice"] for h in run.history], marker="o", markersize=3)
    ax_dice.set(xlabel="iteration", ylabel="Dice (%)", title=f"validation Dice ({run.cfg['val_split']})")
    for ax in (ax_loss, ax_dice):
        ax.set_xlim(0, run.total_iterations)
        ax.grid(alpha=0.3)
        _stage_lines(ax, run)
    return _png(fig)


def validation_comparison(runs: Sequence[RunRecord]) -> bytes:
    """Validation Dice of several runs on one axis."""
    fig = Figure(figsize=(7, 3.2))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16, top=0.9)
    ax = fig.subplots()
    for run in runs:
        ax.plot([h["iteration"] for h in run.history], [100 * h["dice"] for h in run.history], marker="o",
                markersize=3, label=run.label)
    ax.set(xlabel="iteration", ylabel="Dice (%)", title="validation Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def case_overlays(title: str, slices: Sequence[SlicePrediction], num_classes: int) -> bytes:
    """One row per slice: image, ground truth, prediction, pixel uncertainty."""
    fig = Figure(figsize=(8, 2.3 * len(slices) + 0.4))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.55 / (2.3 * len(slices) + 0.4),
                        wspace=0.05, hspace=0.3)
    fig.suptitle(title, fontsize=9)
    axes = fig.subplots(len(slices), 4, squeeze=False)
    for row, pred in zip(axes, slices, strict=True):
        _show_labels(row[0], pred.image, None, num_classes, f"slice {pred.index}")
        _show_labels(row[1], pred.image, pred.label, num_classes, "ground truth")
        _show_labels(row[2], pred.image, pred.prediction, num_classes, "prediction")
        _show_uncertainty(row[3], pred)
    return _png(fig)


def method_comparison(labels: Sequence[str], slices: Sequence[SlicePrediction], num_classes: int) -> bytes:
    """The same slice for every run: image and ground truth, then each run's prediction over its uncertainty."""
    first = slices[0]
    n = len(slices)
    fig = Figure(figsize=(2.1 * (n + 1), 4.9))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.88, wspace=0.05, hspace=0.35)
    fig.suptitle(f"{first.case_id}, slice {first.index}", fontsize=9)
    axes = fig.subplots(2, n + 1, squeeze=False)
    _show_labels(axes[0, 0], first.image, None, num_classes, "image")
    _show_labels(axes[1, 0], first.image, first.label, num_classes, "ground truth")
    for col, (label, pred) in enumerate(zip(labels, slices, strict=True), start=1):
        _show_labels(axes[0, col], pred.image, pred.prediction, num_classes, label, fontsize=7)
        _show_uncertainty(axes[1, col], pred)
    return _png(fig)


def sample_uncertainty_histogram(rows: Sequence[SampleUncertainty]) -> bytes:
    """Eq. 1 over the unlabelled pool, the reliable (stage 1) part and the rest in two colours."""
    values = np.array([r.uncertainty for r in rows])
    reliable = np.array([r.reliable for r in rows])
    finite = np.isfinite(values)  # inf: no predicted foreground (sample_uncertainty_region: foreground)
    fig = Figure(figsize=(7, 3))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.17, top=0.9)
    ax = fig.subplots()
    shown = values[finite]
    bins = np.linspace(shown.min(), shown.max(), 31) if shown.size and shown.max() > shown.min() else 10
    ax.hist([values[finite & reliable], values[finite & ~reliable]], bins=bins, stacked=True,
            label=[f"reliable ({int(reliable.sum())})", f"unreliable ({int((~reliable).sum())})"],
            color=["tab:green", "tab:red"])
    unranked = "" if finite.all() else f"; {int((~finite).sum())} with no predicted foreground, ranked last"
    ax.set(xlabel="sample uncertainty (Eq. 1)", ylabel="unlabelled slices",
           title=f"sample uncertainty of {len(rows)} unlabelled slices{unranked}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def thumbnails(titles: Sequence[str], images: Sequence[np.ndarray]) -> bytes:
    """A row of grey-value slices with their titles."""
    fig = Figure(figsize=(1.9 * len(images), 2.5))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.76, wspace=0.05)
    for ax, title, image in zip(fig.subplots(1, len(images), squeeze=False)[0], titles, images, strict=True):
        ax.imshow(image, cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.set_axis_off()
    return _png(fig)
