"""README's quick start, walked as written: every command of its code block runs (exit 0) in an empty folder beside a
checkout's configs/ and models/, with $DUST_DATA pointing at phantoms in the ACDC and LA layouts (ACDC's validation
volume patient028_frame01 included) and a small MSD-style Task05_Prostate. Training commands get only tiny-budget
overrides appended (iterations, patch, channels, threads), none of which changes a run's folder, so the later
commands find the run directories the README names."""

from __future__ import annotations

import glob
import os
import re
import shlex
from pathlib import Path

import pytest

from dust.cli.main import main
from dust.config import format_run_dir, load_config
from dust.methods.loading import full_config
from tests.test_nifti import _msd

REPO = Path(__file__).resolve().parents[1]
TINY = ["channels=[4,8,16,32,64]", "batch_size=2", "unlabeled_batch_size=2", "threads=1", "tensorboard=false",
        "progress=false"]
TINY_2D = ["patch_size=[32,32]", "iterations=10", "val_every=5"]
TINY_3D = ["patch_size=[16,32,32]", "iterations=4", "val_every=4"]


def quickstart_commands(readme: Path = REPO / "README.md") -> list[str]:
    """The shell lines of the code block after README's quick-start marker, continuations joined, comments kept."""
    text = readme.read_text()
    marker = text.index("<!-- quick start:")
    block = re.search(r"```[^\n]*\n(.*?)```", text[marker:], re.S)
    assert block, "README: no code block after the quick-start marker"
    return [line.strip() for line in block[1].replace("\\\n", " ").splitlines() if line.strip()]


def _argv(line: str) -> list[str]:
    tokens = shlex.split(os.path.expandvars(line), comments=True)
    return [a for t in tokens for a in (sorted(glob.glob(t)) or [t] if "*" in t else [t])]


def _run_dir(argv: list[str]) -> Path:
    """The run folder a `dust train` command as written makes (the README's later lines name it)."""
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return format_run_dir(full_config(load_config(config, sets)))


@pytest.mark.slow
def test_every_quick_start_command_runs_as_written(tmp_path: Path, monkeypatch, capsys):
    from dust.data.phantom import generate_phantom
    from dust.data.phantom3d import generate_la_phantom

    lines = quickstart_commands()
    data = tmp_path / "data"
    # ACDC's layout: patients 1..27 train, 28 validation (patient028_frame01 / _frame02, as in ACDC's val.list)
    generate_phantom(data / "ACDC", n_train_patients=27, n_val_patients=1, n_test_patients=1,
                     slices_per_volume=(2, 3), size_range=(32, 40))
    generate_la_phantom(data / "LA", n_cases=18, shape=(24, 20, 16))  # 8 labelled + 8 held out + 2 unlabelled
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("configs", "models"):
        (work / name).symlink_to(REPO / name)
    _msd(work / "Task05_Prostate", n_labelled=7, n_test=2)
    shipped = sorted(p.name for p in (REPO / "models").iterdir())
    monkeypatch.chdir(work)
    monkeypatch.setenv("DUST_DATA", str(data))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    ran = []
    for line in lines:
        if line.startswith(("#", "source ")):
            continue
        if line.startswith("export "):
            assert line.split()[1].startswith("DUST_DATA="), line  # here: the phantoms
            continue
        argv = _argv(line)
        assert argv[0] == "dust", line
        if argv[1] == "train":
            run_dir = _run_dir(argv)
            dims = len(full_config(load_config(argv[argv.index("--config") + 1]))["patch_size"])
            for kv in [*TINY, *(TINY_3D if dims == 3 else TINY_2D)]:
                argv += ["--set", kv]
            assert _run_dir(argv) == run_dir, line  # the budget overrides leave the run folder as written
        code = main(argv[1:])
        assert code == 0, f"{line}\n{capsys.readouterr().err}"
        ran.append(argv[1])
    assert ran.count("train") == 4 and {"evaluate", "export", "predict", "prepare", "rank"} <= set(ran), ran
    assert sorted(p.name for p in (REPO / "models").iterdir()) == shipped  # evaluating a shipped model wrote nothing
    assert (work / "runs" / "evaluate" / "acdc_dust_7p" / "metrics_val_acdc_dust_7p.json").is_file()
    assert (work / "runs" / "acdc" / "dust_7p_seed1337" / "metrics_val_best.json").is_file()
    assert (work / "out" / "patient028_frame01.nii.gz").is_file()
    assert (work / "predictions" / "uncertainty" / "prostate_07.nii.gz").is_file()
    assert len((work / "next_to_annotate.csv").read_text().splitlines()) == 1 + 2
    assert (work / "runs" / "prostate3d" / "mcf_4p_seed1337" / "metrics_val_last.json").is_file()


def test_the_quick_start_block_is_found_and_names_existing_configs_and_models():
    lines = quickstart_commands()
    assert len([line for line in lines if line.startswith("dust ")]) >= 10
    for line in lines:
        for token in shlex.split(line, comments=True):
            if token.startswith(("configs/", "models/")):
                assert (REPO / token).is_file(), f"README quick start names {token}, which is not in the checkout"
