"""The wheel as a user installs it: `python -m build`, a clean virtual environment, `dust demo` from an empty folder
(the configs travel inside the wheel as package data), every shipped config found by its name."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK_CONFIGS = """
import sys
from importlib.metadata import version
from pathlib import Path

from dust.config import find_config, load_config, shipped_configs

repo = Path(sys.argv[1])
root = shipped_configs()
assert "site-packages" in str(root), root  # the wheel's copy, not the checkout's
names = sorted(p.relative_to(repo / "configs") for p in (repo / "configs").rglob("*.yaml"))
assert names and sorted(p.relative_to(root) for p in root.rglob("*.yaml")) == names
for name in names:
    assert find_config(str(name.with_suffix(""))).read_text() == (repo / "configs" / name).read_text(), name
cfg = load_config("la/mcf")  # through its extends: la/supervised.yaml
assert cfg["method"] == "mcf" and cfg["patch_size"] == [32, 64, 64], cfg
print("dust-seg", version("dust-seg"), len(names), "configs")
"""


def _run(argv: list[str], cwd: Path, timeout: int = 900) -> str:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-3000:]}")
    return done.stdout


@pytest.mark.slow
def test_a_wheel_in_a_clean_venv_runs_the_demo_from_an_empty_folder(tmp_path: Path):
    pytest.importorskip("build", reason="python -m build (pip install build; in dust's dev extras)")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], REPO)  # sdist, then the wheel from it
    wheels = list(dist.glob("dust_seg-*.whl"))
    assert len(wheels) == 1, list(dist.iterdir())

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    torch_spec = shlex.split(os.environ.get("TORCH", "torch==2.13.0"))  # the Makefile's CPU build (local wheel)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *torch_spec, str(wheels[0])], tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    said = _run([str(venv / "bin" / "python"), "-c", CHECK_CONFIGS, str(REPO)], empty)
    assert said.startswith("dust-seg 0.")
    # the short demo: the shipped supervised phantom config at a small patch (this checks the install, not a model)
    out = _run([str(venv / "bin" / "dust"), "demo", "--config", "phantom/supervised", "--iterations", "20",
                "--set", "patch_size=[48,48]", "--set", "threads=1", "--set", "progress=false"], empty)
    assert "validation Dice (%)" in out and (empty / "runs" / "demo" / "report.html").is_file()
    assert (empty / "runs" / "phantom_data" / "train_slices.list").is_file()


def test_a_config_is_found_by_its_shipped_name_from_any_folder(tmp_path: Path, la_phantom_root: Path, capsys,
                                                               monkeypatch):
    from dust.cli.main import main
    from dust.config import ConfigError, find_config, load_config

    monkeypatch.chdir(tmp_path)  # not the repository
    assert find_config("la/mcf") == find_config("la/mcf.yaml") == find_config("configs/la/mcf.yaml")
    assert find_config("la/mcf").read_text() == (REPO / "configs" / "la" / "mcf.yaml").read_text()
    own = tmp_path / "la" / "mcf.yaml"  # a file of the user's own at that path comes first
    own.parent.mkdir()
    own.write_text("method: supervised\n")
    assert load_config("la/mcf.yaml") == {"method": "supervised"}
    assert load_config("la/mcf")["method"] == "mcf"
    with pytest.raises(ConfigError, match=r"config file not found: la/mfc \(nor a config shipped with dust: acdc/\*"):
        find_config("la/mfc")
    assert main(["check-data", "--config", "la/mcf", "--set", f"data_dir={la_phantom_root}",
                 "--set", "labeled_patients=2", "--set", "holdout_cases=2"]) == 0
    assert "is usable with this config" in capsys.readouterr().out
    assert main(["train", "--config", "la/mfc"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
