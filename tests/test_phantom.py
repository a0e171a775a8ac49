"""Tests for the synthetic ACDC-like phantom: layout the ACDC reader relies on, determinism, anatomy."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from dust.data.phantom import generate_phantom, phantom_volume

# Tiny on purpose: the whole module must run in well under a second on a shared CPU.
KW = dict(n_train_patients=3, n_val_patients=1, n_test_patients=1, slices_per_volume=(3, 5),
          frames_per_patient=2, size_range=(64, 72))


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["image"][:], f["label"][:]


def _lines(path: Path) -> list[str]:
    return path.read_text().split()


def _all_arrays(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = _lines(root / "train_slices.list") + _lines(root / "val.list") + _lines(root / "test.list")
    return {n: _read(root / "data" / f"{n}.h5") for n in names}


def _patient(name: str) -> str:
    return name.split("_")[0]


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), seed=0, **KW)


def test_layout_and_lists(ds: Path) -> None:
    train, slices = _lines(ds / "train.list"), _lines(ds / "train_slices.list")
    val, test = _lines(ds / "val.list"), _lines(ds / "test.list")
    assert len(train) == 6 and len(val) == 2 and len(test) == 2  # frames_per_patient volumes per patient
    assert all(c.startswith("patient") and c[-7:] in ("frame01", "frame02") for c in train + val + test)
    # disjoint patients across splits
    pt, pv, ps = ({_patient(c) for c in x} for x in (train, val, test))
    assert len(pt) == 3 and len(pv) == 1 and len(ps) == 1
    assert not (pt & pv or pt & ps or pv & ps)
    # train_slices grouped by patient in patient order, covering every slice of every training volume
    order = [_patient(n) for n in slices]
    assert order == sorted(order) and list(dict.fromkeys(order)) == sorted(pt)
    assert list(dict.fromkeys(n.rsplit("_slice_", 1)[0] for n in slices)) == train
    seen: set[int] = set()
    for name, (img, lab) in _all_arrays(ds).items():
        assert img.dtype == np.float32 and lab.dtype == np.uint8 and img.shape == lab.shape
        assert img.ndim == (2 if "_slice_" in name else 3)
        assert 64 <= img.shape[-2] <= 72 and 64 <= img.shape[-1] <= 72
        assert 0.0 <= img.min() and img.max() <= 1.0
        seen |= set(np.unique(lab).tolist())
    assert seen == {0, 1, 2, 3}
    for c in val + test:  # volumes are min-max normalised to exactly [0, 1]
        img, _ = _read(ds / "data" / f"{c}.h5")
        assert img.min() == 0.0 and img.max() == 1.0 and 3 <= img.shape[0] <= 5
    meta = json.loads((ds / "phantom.json").read_text())
    assert meta["complete"] and meta["seed"] == 0


def test_deterministic_by_seed(ds: Path, tmp_path: Path) -> None:
    again = _all_arrays(generate_phantom(tmp_path / "a", seed=0, **KW))
    first = _all_arrays(ds)
    assert again.keys() == first.keys()
    for k, (img, lab) in first.items():
        assert np.array_equal(img, again[k][0]) and np.array_equal(lab, again[k][1])
    other = _all_arrays(generate_phantom(tmp_path / "b", seed=1, **KW))
    assert any(k not in other or other[k][0].shape != v[0].shape or not np.array_equal(other[k][0], v[0])
               for k, v in first.items())


def test_reuse_regenerate_and_refuse_foreign(tmp_path: Path) -> None:
    root = generate_phantom(tmp_path / "p", seed=0, **KW)
    stamp = (root / "phantom.json").stat().st_mtime_ns
    first_slice = root / "data" / f"{_lines(root / 'train_slices.list')[0]}.h5"
    slice_stamp = first_slice.stat().st_mtime_ns
    generate_phantom(root, seed=0, **KW)  # same arguments: reused, not rewritten
    assert (root / "phantom.json").stat().st_mtime_ns == stamp
    assert first_slice.stat().st_mtime_ns == slice_stamp
    generate_phantom(root, seed=0, **{**KW, "n_train_patients": 2})  # changed arguments: regenerated
    assert json.loads((root / "phantom.json").read_text())["n_train_patients"] == 2
    assert len(_lines(root / "train.list")) == 4 and _lines(root / "val.list")[0] == "patient003_frame01"
    assert not list((root / "data").glob("patient003_*_slice_*"))  # stale training slices were removed
    foreign = tmp_path / "acdc"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "patient001_frame01.h5").write_bytes(b"real data")
    with pytest.raises(FileExistsError):
        generate_phantom(foreign, **KW)


def test_anatomy(ds: Path) -> None:
    ok = total = 0
    for img, lab in _all_arrays(ds).values():
        for im2, lab2 in zip(img.reshape(-1, *img.shape[-2:]), lab.reshape(-1, *lab.shape[-2:]), strict=True):
            lv = lab2 == 3
            if lv.any():
                total += 1
                ok += bool(np.all(np.isin(lab2[ndimage.binary_dilation(lv)], (2, 3))))
                # the blood pool is brighter than the myocardium on average
                assert im2[lv].mean() > im2[lab2 == 2].mean()
    assert total > 0 and ok >= 0.95 * total
    for c in _lines(ds / "val.list") + _lines(ds / "test.list"):  # heart shrinks from base to apex
        _, lab = _read(ds / "data" / f"{c}.h5")
        areas = (lab > 0).sum(axis=(1, 2))
        assert areas[0] > areas[-1] > 0


def test_phantom_volume_direct() -> None:
    img, lab = phantom_volume(np.random.default_rng(3), 4, (40, 48))
    img2, lab2 = phantom_volume(np.random.default_rng(3), 4, (40, 48))
    assert img.shape == lab.shape == (4, 40, 48) and img.dtype == np.float32 and lab.dtype == np.uint8
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)
    assert img.min() == 0.0 and img.max() == 1.0 and set(np.unique(lab)) <= {0, 1, 2, 3}
