"""Deterministic synthetic cardiac short-axis MRI ("phantom") in the SSL4MIS ACDC h5 layout.

Why: real ACDC cannot ship with the package (licence, size), yet the ACDC reader, the semi-supervised
training loops, demos and tests must run end to end on something with the same files, lists and label
convention (0 background, 1 RV, 2 myocardium, 3 LV blood pool). The images are made hard enough that
intensity alone is not a perfect classifier (bright vessels, dark lungs, dark papillary muscles inside the
LV, bias field, noise, blur), so a segmentation network has to learn shape and context.

Layout written under ``root`` (what the ACDC reader expects)::

    data/<case>_slice_<n>.h5   training slices: image float32 (H, W) in [0, 1], label uint8 (H, W)
    data/<case>.h5             val / test volumes: image float32 (S, H, W), label uint8 (S, H, W)
    train_slices.list          training slice names, grouped by patient in patient order
    train.list, val.list, test.list   volume case names such as patient001_frame01
    phantom.json               generation arguments (lets repeated calls reuse the dataset)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from dust.data.types import write_h5

__all__ = ["generate_phantom", "phantom_volume"]

# Bump whenever the generator's output changes, so cached datasets on disk are regenerated.
_FORMAT_VERSION = 1


def _col(a: np.ndarray | float) -> np.ndarray:
    """Per-slice values shaped (S, 1, 1) so they broadcast against (H, W) pixel grids."""
    return np.asarray(a, dtype=np.float64).reshape(-1, 1, 1)


def phantom_volume(rng: np.random.Generator, n_slices: int, shape: tuple[int, int], *, phase: float = 0.0,
                   noise_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return one (image float32 (S, H, W) in [0, 1], label uint8 (S, H, W)) short-axis volume.

    Slice 0 is the base, slice S-1 the apex: the heart shrinks towards the apex and the RV vanishes before
    it. All anatomy is drawn from ``rng`` first, in a fixed order, so re-seeding ``rng`` identically gives
    the same patient; ``phase`` (0 = end-diastole, 1 = end-systole) then contracts the LV and thickens the
    wall, and the acquisition noise comes from ``noise_rng`` (default ``rng``). This is how the two frames
    of one patient share anatomy but differ like ACDC's ED/ES frames.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    h, w = (int(v) for v in shape)
    m, s = float(min(h, w)), int(n_slices)
    noise_rng = rng if noise_rng is None else noise_rng
    t = np.linspace(0.0, 1.0, s) if s > 1 else np.zeros(1)  # 0 = base, 1 = apex
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)

    # ---- anatomy and acquisition parameters (every draw unconditional: fixed order => reproducible) ----
    r_lv0, thick_rel = rng.uniform(0.08, 0.115) * m, rng.uniform(0.35, 0.55)
    ecc, rot = rng.uniform(0.85, 1.15), rng.uniform(0.0, np.pi)
    centre = np.array([h, w]) * rng.uniform(0.43, 0.57, 2)
    drift = rng.normal(0.0, 0.05 * m, 2)  # the long axis is oblique to the slice stack
    wob_a, wob_p = rng.uniform(0.0, 0.06, 2), rng.uniform(0.0, 2 * np.pi, 2)
    rv_dir = (np.pi if rng.random() < 0.5 else 0.0) + rng.uniform(-0.6, 0.6)  # RV on the left or right
    rv_off, rv_w, rv_len = rng.uniform(0.5, 0.75), rng.uniform(0.45, 0.8), rng.uniform(1.05, 1.4)
    rv_stop = rng.uniform(0.75, 1.05)  # fraction of the stack beyond which there is no RV
    pap_ang = rng.uniform(0.0, 2 * np.pi) + np.array([0.0, rng.uniform(1.8, 2.6)])
    body_c = np.array([h, w]) * rng.uniform(0.47, 0.53, 2)
    body_ax = np.array([h, w]) * rng.uniform(0.42, 0.50, 2)
    fat_w = rng.uniform(0.02, 0.045) * m
    n_blob = int(rng.integers(4, 8))
    blob_ang, blob_dist = rng.uniform(0.0, 2 * np.pi, n_blob), rng.uniform(2.1, 3.8, n_blob)
    blob_ax, blob_rot = rng.uniform(0.04, 0.16, (n_blob, 2)) * m, rng.uniform(0.0, np.pi, n_blob)
    blob_vel, blob_grow = rng.normal(0.0, 0.05 * m, (n_blob, 2)), rng.uniform(-0.4, 0.3, n_blob)
    blob_int = rng.uniform(0.03, 0.95, n_blob)  # dark lung .. bright vessels: overlaps heart intensities
    i_lv, i_myo = rng.uniform(0.7, 0.95), rng.uniform(0.18, 0.35)
    i_rv, i_tis, i_fat = i_lv * rng.uniform(0.8, 1.0), i_myo + rng.uniform(0.08, 0.2), rng.uniform(0.6, 0.85)
    i_rim = rng.uniform(i_tis, i_fat)  # epicardial fat / pericardium outlining the heart
    bias, blur = rng.normal(0.0, 0.3, 5), rng.uniform(0.4, 0.9)
    jit = rng.normal(0.0, 0.04, (s, 2))  # per-slice size and brightness jitter
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (h, w)), 0.03 * m)  # smooth tissue heterogeneity

    ph = float(np.clip(phase, 0.0, 1.0))
    r = _col(r_lv0 * (1 - 0.3 * ph) * (1 - 0.6 * t**1.3) * (1 + jit[:, 0]))
    thick = _col(thick_rel * r_lv0 * (1 + 0.35 * ph) * (0.85 + 0.3 * t))
    big_r = r + thick  # epicardial radius
    cy, cx = _col(centre[0] + drift[0] * (t - 0.5)), _col(centre[1] + drift[1] * (t - 0.5))

    # ---- label geometry: wobbly rotated ellipses for LV and epicardium, an offset ellipse for the RV ----
    dy, dx = yy - cy, xx - cx  # (S, H, W)
    u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
    rho, ang = np.sqrt(u * u / ecc + v * v * ecc), np.arctan2(v, u)
    wob = 1 + wob_a[0] * np.cos(2 * ang + wob_p[0]) + wob_a[1] * np.cos(3 * ang + wob_p[1])
    lv, epi = rho < r * wob, rho < big_r * wob
    g = _col(np.clip(1 - t / rv_stop, 0.0, 1.0) ** 0.5)  # RV size factor, 0 near the apex
    ex, ey = np.cos(rv_dir), np.sin(rv_dir)
    p, q = dx - big_r * rv_off * ex, dy - big_r * rv_off * ey
    along, perp = p * ex + q * ey, -p * ey + q * ex
    a_rv, b_rv = big_r * (1 - rv_off + rv_w * g), big_r * rv_len * (0.7 + 0.3 * g)
    rv = ((along / a_rv) ** 2 + (perp / b_rv) ** 2 < 1) & ~epi & (g > 0.1)
    for k in range(s):  # keep one crescent: the ellipse tips can leave 1-2 pixel specks beside the myocardium
        cc, n_cc = ndimage.label(rv[k])
        if n_cc > 1:
            rv[k] = cc == 1 + int(np.argmax(np.bincount(cc.ravel())[1:]))
    pap = np.zeros_like(lv)  # papillary muscles: myocardium-dark dots labelled as LV cavity (as in ACDC)
    for a in pap_ang:
        pap |= (dx - 0.66 * r * np.cos(a)) ** 2 + (dy - 0.66 * r * np.sin(a)) ** 2 < (0.15 * r) ** 2
    pap &= lv & (r > 5)

    # ---- background: body ellipse with a bright subcutaneous fat rim and random tissue blobs ----
    body_rho = np.hypot((yy - body_c[0]) / body_ax[0], (xx - body_c[1]) / body_ax[1])
    body = body_rho < 1
    img = np.where(body, np.where(body_rho > 1 - fat_w / body_ax.min(), i_fat, i_tis), 0.0)
    img = np.repeat((img * (1 + 0.12 * texture / max(float(texture.std()), 1e-8)))[None], s, axis=0)
    r0 = big_r.max()
    for k in range(n_blob):
        by = centre[0] + blob_dist[k] * r0 * np.sin(blob_ang[k]) + _col(blob_vel[k, 0] * t)
        bx = centre[1] + blob_dist[k] * r0 * np.cos(blob_ang[k]) + _col(blob_vel[k, 1] * t)
        ax = blob_ax[k] * _col(1 + blob_grow[k] * t)[..., None]
        c, sn = np.cos(blob_rot[k]), np.sin(blob_rot[k])
        bu, bv = (xx - bx) * c + (yy - by) * sn, -(xx - bx) * sn + (yy - by) * c
        img[((bu / ax[..., 0]) ** 2 + (bv / ax[..., 1]) ** 2 < 1) & body] = blob_int[k]

    # ---- heart on top: tissue rim, dark myocardium, bright blood pools ----
    bright = _col(1 + jit[:, 1])
    img = np.where(rho < big_r * wob + 1.5, i_rim, img)
    img = np.where(epi, i_myo, img)
    img = np.where(rv, i_rv * bright, img)
    img = np.where(lv, np.where(pap, i_myo + 0.3 * (i_lv - i_myo), i_lv * bright), img)
    label = np.zeros((s, h, w), dtype=np.uint8)
    label[rv], label[epi], label[lv] = 1, 2, 3

    # ---- acquisition: smooth multiplicative bias field, blur, Rician noise, volume min-max to [0, 1] ----
    bxn, byn = (xx - w / 2) / m, (yy - h / 2) / m
    img = img * np.exp(bias[0] * bxn + bias[1] * byn + bias[2] * bxn**2 + bias[3] * byn**2
                       + bias[4] * bxn * byn)
    img = ndimage.gaussian_filter(img, sigma=(0.0, blur, blur))
    sd = noise_rng.uniform(0.015, 0.04) * img.max()
    n = noise_rng.normal(0.0, sd, (2, s, h, w))
    img = np.sqrt((img + n[0]) ** 2 + n[1] ** 2)
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
    return img.astype(np.float32), label


def _params(**kw: object) -> dict:
    """JSON-normalised generation arguments (tuples -> lists) so they compare equal after a round trip."""
    return json.loads(json.dumps({"format_version": _FORMAT_VERSION, **kw}))


def _is_complete(root: Path, params: dict) -> bool:
    """True when root holds a finished phantom made with ``params`` and every listed file still exists."""
    try:
        meta = json.loads((root / "phantom.json").read_text())
        if meta != {"complete": True, **params}:
            return False
        names = [c for n in ("train_slices", "val", "test") for c in (root / f"{n}.list").read_text().split()]
    except (OSError, ValueError):
        return False
    return (root / "train.list").is_file() and all((root / "data" / f"{c}.h5").is_file() for c in names)


def generate_phantom(root: str | Path, n_train_patients: int = 12, n_val_patients: int = 4,
                     n_test_patients: int = 2, slices_per_volume: tuple[int, int] = (6, 10),
                     frames_per_patient: int = 2, seed: int = 0, overwrite: bool = False,
                     size_range: tuple[int, int] = (96, 128)) -> Path:
    """Write a synthetic ACDC-like dataset under ``root`` and return ``root`` as a Path.

    Patients ``patient001..`` are assigned in order to train, val and test (disjoint). Each patient gets
    ``frames_per_patient`` (1 or 2) volumes ``frame01``/``frame02`` sharing anatomy (ED/ES-like), a slice
    count drawn from ``slices_per_volume`` (inclusive) and H, W drawn from ``size_range`` (inclusive).
    Training volumes are stored as 2-D slices, val/test as 3-D volumes, as in SSL4MIS.

    Why cached: demos and tests call this repeatedly. If ``root/phantom.json`` records a complete dataset
    made with the same arguments, nothing is rewritten; otherwise it is (re)generated. ``overwrite=True``
    forces regeneration. A ``root/data`` not made by this function (no phantom.json, e.g. real ACDC) is
    never silently mixed with phantom files: that raises FileExistsError unless ``overwrite=True``.
    Output arrays are a pure function of the arguments (numpy Generators seeded by (seed, patient)).
    """
    root = Path(root)
    lo, hi = (int(v) for v in slices_per_volume)
    if not 1 <= lo <= hi or frames_per_patient not in (1, 2) or seed < 0 or min(size_range) < 16:
        raise ValueError("need 1 <= slices lo <= hi, frames_per_patient in (1, 2), seed >= 0, sizes >= 16")
    params = _params(n_train_patients=n_train_patients, n_val_patients=n_val_patients,
                     n_test_patients=n_test_patients, slices_per_volume=[lo, hi],
                     frames_per_patient=frames_per_patient, seed=seed, size_range=list(size_range))
    meta, data = root / "phantom.json", root / "data"
    if not overwrite and _is_complete(root, params):
        return root
    if meta.exists():  # our own earlier (possibly partial) phantom: clear its files
        for f in data.glob("*.h5"):
            f.unlink()
    elif data.is_dir() and any(data.iterdir()) and not overwrite:
        raise FileExistsError(f"{data} exists and was not made by generate_phantom; pass overwrite=True")
    data.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"complete": False, **params}))  # marks the directory as ours while writing

    lists: dict[str, list[str]] = {"train_slices": [], "train": [], "val": [], "test": []}
    splits = ["train"] * n_train_patients + ["val"] * n_val_patients + ["test"] * n_test_patients
    for i, split in enumerate(splits):
        pid = i + 1
        meta_rng = np.random.default_rng([seed, pid, 0])
        n_sl = int(meta_rng.integers(lo, hi + 1))
        shape = tuple(int(v) for v in meta_rng.integers(size_range[0], size_range[1] + 1, 2))
        for fr in range(1, frames_per_patient + 1):
            case = f"patient{pid:03d}_frame{fr:02d}"
            img, lab = phantom_volume(np.random.default_rng([seed, pid, 1]), n_sl, shape, phase=fr - 1.0,
                                      noise_rng=np.random.default_rng([seed, pid, 2, fr]))
            lists[split].append(case)
            if split == "train":
                for k in range(n_sl):
                    write_h5(data / f"{case}_slice_{k}.h5", img[k], lab[k])
                    lists["train_slices"].append(f"{case}_slice_{k}")
            else:
                write_h5(data / f"{case}.h5", img, lab)
    for name, items in lists.items():
        (root / f"{name}.list").write_text("".join(f"{c}\n" for c in items))
    meta.write_text(json.dumps({"complete": True, **params}, indent=2) + "\n")
    return root
