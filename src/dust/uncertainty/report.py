"""What a user reads from the uncertainty estimates: the ranked CSV of unlabelled slices and PNG panels."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def write_sample_uncertainty_csv(
    path: Path, ids: list[str], patients: list[str], uncertainty: torch.Tensor, order: torch.Tensor,
    reliable: torch.Tensor,
) -> None:
    """One row per unlabelled slice, most reliable first (rank 1). The bottom of the list is where the
    pre-training checkpoints disagreed most: the slices worth annotating next."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    reliable_set = set(reliable.tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "image_id", "patient", "uncertainty", "subset"])
        for i in order.tolist():
            w.writerow([int(rank[i]), ids[i], patients[i], f"{float(uncertainty[i]):.6g}",
                        "reliable" if i in reliable_set else "unreliable"])


def save_uncertainty_figure(
    path: Path, titles: list[str], images: list[torch.Tensor], labels: list[torch.Tensor],
    kl_maps: list[torch.Tensor], entropy_maps: list[torch.Tensor], num_classes: int,
) -> None:
    """One row per example: image, pseudo-label, decoder KL (Eq. 2) and the main decoder's entropy."""
    # No pyplot: a bare Figure renders with Agg and touches no global backend state.
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    classes = ListedColormap(["black", *colormaps["tab10"].colors[: max(num_classes - 1, 1)]])

    fig = Figure(figsize=(8, 2.3 * len(images)))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / len(images), wspace=0.05, hspace=0.3)
    axes = fig.subplots(len(images), 4, squeeze=False)
    for row, (title, img, lab, kl, ent) in enumerate(zip(titles, images, labels, kl_maps, entropy_maps,
                                                         strict=True)):
        # Maps are scaled per panel, so the range is in the title (colour bars cost more than the rest together).
        panels = [(img[0], "gray", (None, None), title), (lab, classes, (0, classes.N - 1), "pseudo-label"),
                  (kl, "magma", (0, None), f"D_kl (main || aux)\n0 .. {float(kl.max()):.3g}"),
                  (ent, "viridis", (0, None), f"entropy (main)\n0 .. {float(ent.max()):.3g}")]
        for ax, (data, cmap, (vmin, vmax), name) in zip(axes[row], panels, strict=True):
            ax.imshow(data.float().numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(name, fontsize=7)
            ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
