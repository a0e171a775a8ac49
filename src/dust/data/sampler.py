"""Two-stream batch sampler: every step yields a labelled batch and, when asked, an unlabelled batch.

Items are ``(C, *spatial)`` (slices for a 2D model, volumes for a 3D one); the spatial policy makes each a patch:
``resize`` (the whole item resized to the patch) or ``crop`` (pad + random crop, optional foreground
oversampling on the labelled stream); see :mod:`dust.data.transforms`. With ``unlabeled_margin`` the unlabelled
crops are larger by that margin on both sides of each axis (their centre patch placed as a plain crop would be), so
that a method can cut windows shifted around the centre patch out of one augmented crop (fixed + dynamic
pseudo-labels, :mod:`dust.methods.fixdyn`).

Each stream walks a seeded random permutation of its pool and reshuffles when it runs out (iteration-based
training, as in SSL4MIS, without its epoch bookkeeping). All randomness lives in one ``torch.Generator``, so
``state_dict`` / ``load_state_dict`` make a resumed run draw exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import torch

from dust.data.transforms import augment_crop, augment_pair
from dust.data.types import ItemSet, as_tensor


class _Stream:
    def __init__(self, size: int) -> None:
        self.indices = torch.arange(size)  # the pool this stream draws from (a subset for staged methods)
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        out = []
        while n > 0:
            if self.pos >= len(self.perm):
                self.perm = self.indices[torch.randperm(len(self.indices), generator=gen)]
                self.pos = 0
            take = min(n, len(self.perm) - self.pos)
            out.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            n -= take
        return torch.cat(out)


# the batch keys before 2026-12-08, for a user's own method that still reads them
_RENAMED_KEYS = {"x_l": "labeled_image", "y_l": "label", "idx_l": "labeled_index", "x_u": "unlabeled_image",
                 "idx_u": "unlabeled_index", "y_u": "pseudo_label"}


class Batch(dict):
    """One step's batch (key -> tensor); a key it does not hold is a ``KeyError`` saying which keys it has, and
    for a key of older dust versions, its new name."""

    def __missing__(self, key: str) -> Any:
        renamed = f" (renamed {_RENAMED_KEYS[key]!r})" if key in _RENAMED_KEYS else ""
        raise KeyError(f"batch key {key!r}{renamed}; this batch holds {sorted(self)}")


class TwoStreamSampler:
    """Draws augmented batches from in-memory items (slices or volumes): ``labeled_image``, ``label``,
    ``labeled_index``, and with unlabelled data ``unlabeled_image``, ``unlabeled_index`` and, once a method has set
    them, ``pseudo_label``."""

    def __init__(
        self,
        labeled: ItemSet,
        unlabeled: ItemSet | None,
        batch_size: int,
        unlabeled_batch_size: int,
        patch_size: tuple[int, ...],
        seed: int,
        rot_flip: bool = True,
        rotate_deg: float = 20.0,
        interpolation: str = "bilinear",
        spatial_policy: str = "resize",
        foreground_oversample: float = 0.0,
        unlabeled_margin: tuple[int, ...] | None = None,
    ) -> None:
        if len(labeled) == 0:
            raise ValueError("the labelled set is empty: nothing to train on")
        self.labeled, self.unlabeled = labeled, unlabeled
        self.batch_size, self.unlabeled_batch_size = batch_size, unlabeled_batch_size
        self.patch_size = tuple(patch_size)
        self.rot_flip, self.rotate_deg, self.interpolation = rot_flip, rotate_deg, interpolation
        if spatial_policy not in ("resize", "crop"):
            raise ValueError(f"unknown spatial_policy {spatial_policy!r}; choose resize or crop")
        self.spatial_policy, self.foreground_oversample = spatial_policy, foreground_oversample
        self.unlabeled_patch_size, self.unlabeled_margin = self.patch_size, None
        if unlabeled_margin:
            if spatial_policy != "crop" or len(unlabeled_margin) != len(self.patch_size) or min(unlabeled_margin) < 0:
                raise ValueError(f"unlabeled_margin {tuple(unlabeled_margin)} needs spatial_policy crop and one "
                                 f"margin >= 0 per axis of the patch {self.patch_size}")
            self.unlabeled_margin = tuple(unlabeled_margin)
            self.unlabeled_patch_size = tuple(p + 2 * m for p, m in zip(self.patch_size, unlabeled_margin,
                                                                        strict=True))
        self.pseudo_labels: list[torch.Tensor] | None = None  # of the unlabelled items: set_pseudo_labels
        self.generator = torch.Generator().manual_seed(seed)
        self.labeled_stream = _Stream(len(labeled))
        self.unlabeled_stream = _Stream(len(unlabeled) if unlabeled is not None else 0)

    @classmethod
    def from_config(cls, labeled: ItemSet, unlabeled: ItemSet | None, cfg: dict[str, Any],
                    seed: int, unlabeled_margin: tuple[int, ...] | None = None) -> TwoStreamSampler:
        """A sampler with a resolved config's batch sizes, patch size and augmentation."""
        return cls(labeled, unlabeled, cfg["batch_size"], cfg["unlabeled_batch_size"], tuple(cfg["patch_size"]),
                   seed, cfg["augment_rot_flip"], cfg["augment_rotate_deg"], cfg["image_interpolation"],
                   cfg["spatial_policy"], cfg["foreground_oversample"], unlabeled_margin)

    @property
    def unlabeled_indices(self) -> torch.Tensor:
        """The pool indices the unlabelled stream draws from."""
        return self.unlabeled_stream.indices

    @property
    def unlabeled_walk_restarted(self) -> bool:
        """Whether the unlabelled stream has drawn nothing since it was last (re)set (a new subset, or a reseed)."""
        return len(self.unlabeled_stream.perm) == 0

    def reseed(self, seed: int) -> None:
        """A fresh generator and fresh walks over the same pools (each stream keeps its subset)."""
        self.generator = torch.Generator().manual_seed(seed)
        for stream in (self.labeled_stream, self.unlabeled_stream):
            stream.perm, stream.pos = torch.empty(0, dtype=torch.long), 0

    def set_unlabeled_indices(self, indices: list[int] | torch.Tensor) -> None:
        """Restrict the unlabelled stream to a subset of the pool (e.g. DUST's reliable half)."""
        self.unlabeled_stream.indices = torch.as_tensor(indices, dtype=torch.long)
        self.unlabeled_stream.perm = torch.empty(0, dtype=torch.long)
        self.unlabeled_stream.pos = 0

    def set_pseudo_labels(self, labels: list[torch.Tensor] | None) -> None:
        """Fixed pseudo-labels of the unlabelled items (each on its item's grid; a self-training method's), drawn
        as ``pseudo_label`` with their image and augmented together with it."""
        self.pseudo_labels = labels

    def _batch(self, pool: ItemSet, idx: torch.Tensor, labels: list[torch.Tensor] | None, foreground: float = 0.0,
               margin: tuple[int, ...] | None = None):
        patch_size = self.patch_size if margin is None else self.unlabeled_patch_size
        xs, ys = [], []
        for i in idx.tolist():
            label = None if labels is None else labels[i]
            if self.spatial_policy == "resize":
                label = None if label is None else as_tensor(label)
                x, y = augment_pair(as_tensor(pool.images[i]), label, patch_size, self.generator, self.rot_flip,
                                    self.rotate_deg, self.interpolation)
            else:
                x, y = augment_crop(pool.images[i], label, patch_size, self.generator, self.rot_flip,
                                    self.rotate_deg, self.interpolation, foreground, margin)
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), (torch.stack(ys) if labels is not None else None)

    def next(self, with_unlabeled: bool, labeled_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """One step's batch: ``labeled_batch_size`` (default ``batch_size``) labelled items, and
        ``unlabeled_batch_size`` unlabelled ones when ``with_unlabeled``."""
        count = self.batch_size if labeled_batch_size is None else labeled_batch_size
        idx_l = self.labeled_stream.draw(count, self.generator)
        x_l, y_l = self._batch(self.labeled, idx_l, self.labeled.labels, self.foreground_oversample)
        batch = {"labeled_image": x_l, "label": y_l, "labeled_index": idx_l}
        if with_unlabeled:
            if self.unlabeled is None or len(self.unlabeled_stream.indices) == 0:
                raise ValueError("this method needs unlabelled data but the unlabelled pool is empty")
            idx_u = self.unlabeled_stream.draw(self.unlabeled_batch_size, self.generator)
            x_u, y_u = self._batch(self.unlabeled, idx_u, self.pseudo_labels, margin=self.unlabeled_margin)
            batch.update(unlabeled_image=x_u, unlabeled_index=idx_u)
            if y_u is not None:
                batch["pseudo_label"] = y_u  # pseudo-labels, never ground truth
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "streams": [
                {"indices": s.indices, "perm": s.perm, "pos": s.pos}
                for s in (self.labeled_stream, self.unlabeled_stream)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        for s, saved in zip((self.labeled_stream, self.unlabeled_stream), state["streams"], strict=True):
            s.indices, s.perm, s.pos = saved["indices"], saved["perm"], int(saved["pos"])
