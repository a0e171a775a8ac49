"""The results table (mean ± std over seeds, variants kept apart) and the benchmark that fills it."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from dust.benchmark import Protocol, plan_benchmark, run_benchmark
from dust.cli.main import main
from dust.config import load_config, resolve_bf16
from dust.engine.errors import RunFailedError
from dust.methods.loading import full_config
from dust.results import (
    Comparison,
    group_over_seeds,
    identity_of,
    readme_markers,
    replace_readme_table,
    results_markdown,
    update_results,
)

# what `bf16: auto` resolves to on this machine (bf16 only where the CPU computes it natively)
NATIVE_PRECISION = "bf16" if resolve_bf16("auto", "cpu") else "fp32"
NATIVE_BF16 = "true" if NATIVE_PRECISION == "bf16" else "false"  # as every stored command writes it


def _add_records(path: str, seeds: list[int], start) -> None:
    start.wait()
    for seed in seeds:
        update_results(Path(path), [_record(seed, 60.0)])

DEFAULT = {"method": "supervised", "labeled_patients": 7, "iterations": 4000, "split": "val", "precision": "bf16",
           "resize": "bilinear", "decoder": "bilinear", "options": ""}


def _record(seed: int, dice: float, checkpoint: str = "last", **identity) -> dict:
    per_class = {c: {"dice": dice + d, "jaccard": dice - 10, "hd95_vox": 5.0, "asd_vox": 1.0}
                 for c, d in (("RV", -10.0), ("Myo", 0.0), ("LV", 10.0))}
    return {**DEFAULT, **identity, "seed": seed, "checkpoint": checkpoint, "dice": dice, "jaccard": dice - 10,
            "hd95_vox": 5.0, "asd_vox": 1.0, "per_class": per_class, "train_seconds": 10.0,
            "command": f"dust train --set seed={seed} {identity}"}


def _rows(md: str, section: str) -> list[str]:
    """The table rows under a ``## section`` heading."""
    block = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_seeds_are_averaged_but_variants_are_not():
    records = [_record(1, 60.0), _record(2, 70.0), _record(1, 50.0, precision="fp32"),
               _record(1, 80.0, checkpoint="best"), _record(2, 90.0, checkpoint="best")]
    groups = group_over_seeds(records)
    assert sorted(len(rs) for rs in groups.values()) == [1, 2, 2]
    md = results_markdown(records, "T")
    last = _rows(md, "Last checkpoint")
    # population std over the two seeds: mean 65, std 5
    assert last[0].startswith(
        "| supervised | 7 | 4000, val, bf16, bilinear, bilinear | 1, 2 | 2 | 65.00 ± 5.00 | 55.00 ± 5.00 |")
    assert last[1].startswith("| supervised | 7 | 4000, val, fp32, bilinear, bilinear | 1 | 1 | 50.00 | 40.00 |")
    assert len(last) == 2
    best = _rows(md, "Best checkpoint")
    assert len(best) == 1 and "| 85.00 ± 5.00 |" in best[0]
    per_class = _rows(md, "Dice per class")
    assert "| last | 2 | 55.00 ± 5.00 | 65.00 ± 5.00 | 75.00 ± 5.00 |" in per_class[0]
    commands = md.split("## Commands", 1)[1]
    assert all(r["command"] in commands for r in records)


def test_a_changed_method_option_is_its_own_record_and_row(tmp_path: Path):
    cfg = full_config(load_config(Path(__file__).parents[1] / "configs" / "acdc" / "dust.yaml"))
    assert identity_of(cfg, "last")["options"] == ""
    variant = identity_of({**cfg, "restart_lr_per_stage": False}, "last")
    assert variant["options"] == "restart_lr_per_stage=False"
    # an engine option that changes the numbers is part of the identity too
    recalibrated = identity_of({**cfg, "batchnorm_recalibration_batches": 50}, "last")
    assert recalibrated["options"] == "batchnorm_recalibration_batches=50"
    default_run = {**_record(1, 40.0), **identity_of(cfg, "last")}
    variant_run = {**_record(1, 70.0), **variant}
    path = tmp_path / "r.json"
    update_results(path, [default_run])
    stored = update_results(path, [variant_run])  # an ablation must not replace the default method's record
    assert sorted(r["dice"] for r in stored) == [40.0, 70.0]
    rows = _rows(results_markdown(stored, "T"), "Last checkpoint")
    assert len(rows) == 2 and any("restart_lr_per_stage=False | 1337 | 1 | 70.00" in r for r in rows)


def test_methods_side_by_side_uses_one_setting_and_shows_what_is_missing():
    recal = {"options": "batchnorm_recalibration_batches=50"}
    records = [_record(1, 70.0, **recal), _record(2, 72.0, **recal),  # supervised at the setting: mean 71
               _record(1, 60.0),  # supervised without recalibration: another setting, not in the comparison
               _record(1, 75.5, method="dust", decoder="deconv+bilinear", **recal),
               _record(3, 79.5, method="dust", decoder="deconv+bilinear", **recal),  # a seed supervised lacks
               _record(1, 74.0, method="cps", **recal), _record(2, 71.0, method="cps", **recal),
               _record(1, 90.0, method="dust", checkpoint="best", decoder="deconv+bilinear", **recal),
               _record(1, 80.0, method="dust", labeled_patients=14, decoder="deconv+bilinear", **recal),
               _record(2, 73.0, method="ua_mt", **recal)]  # one of supervised's two seeds
    comparison = Comparison(("supervised", "cps", "dust", "ua_mt"), (7, 14), {"precision": "bf16", **recal}, "NOTE")
    md = results_markdown(records, "T", comparison)
    rows = _rows(md, "Methods side by side")
    assert [r.split(" | ")[:2] for r in rows] == [[f"| {m}", n] for n in ("7", "14")
                                                  for m in ("supervised", "cps", "dust", "ua_mt")]
    assert rows[0].startswith("| supervised | 7 | bilinear | 1, 2 | 2 | 71.00 ± 1.00 | reference |")
    assert "| 0 | not measured yet |" in rows[5] and "| 0 | not measured yet |" in rows[4]
    # the last checkpoint's Dice minus the supervised one at the same budget, setting and seed: mean ± std of the
    # per-seed differences (cps: 74-70 and 71-72), on the seeds both have (dust: seed 1 only, and it says so)
    assert rows[1].startswith("| cps | 7 | bilinear | 1, 2 | 2 | 72.50 ± 1.50 | +1.50 ± 2.50 |")
    assert rows[2].startswith("| dust | 7 | deconv+bilinear | 1, 3 | 2 | 77.50 ± 2.00 | +5.50 (seed 1) |")
    # a one-seed row names its seed: the supervised cell beside it is the mean of two
    assert rows[3].startswith("| ua_mt | 7 | bilinear | 2 | 1 | 73.00 | +1.00 (seed 2) |")
    assert rows[6].startswith("| dust | 14 | deconv+bilinear | 1 | 1 | 80.00 |  |")  # no baseline to subtract
    assert "NOTE" in md.split("## Methods side by side", 1)[1].split("\n## ", 1)[0]
    assert "## Methods side by side" not in results_markdown(records, "T")


def test_readme_table_is_rewritten_between_its_markers(tmp_path: Path):
    start, end = readme_markers("tiny")
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n{start}\nold table\n{end}\nafter\n")
    records = [_record(1, 60.0), _record(2, 70.0), _record(1, 80.0, checkpoint="best"),
               _record(1, 66.0, method="dust", decoder="deconv+bilinear"),
               _record(2, 73.0, method="dust", decoder="deconv+bilinear"),
               _record(1, 99.0, method="dust", precision="fp32"), _record(1, 50.0, labeled_patients=14)]
    comparison = Comparison(("supervised", "dust", "cps"), (7, 14), {"precision": "bf16"})
    replace_readme_table(readme, records, "tiny", comparison, "docs/results/tiny.md")
    text = readme.read_text()
    assert text.startswith("# intro\n") and text.endswith(f"{end}\nafter\n") and "old table" not in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    # last checkpoint at the comparison's setting (the fp32 and best records are not in it), seeds averaged, and
    # the paired difference to supervised; a method with no record at all gets no row
    assert rows["| supervised"] == "| supervised | 65.00 ± 5.00 (2 seeds) | reference | 50.00 (1 seed) | reference |"
    assert rows["| dust"] == "| dust | 69.50 ± 3.50 (2 seeds) | +4.50 ± 1.50 | not run |  |"
    assert "| cps" not in rows and "[docs/results/tiny.md](docs/results/tiny.md)" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        replace_readme_table(readme, records, "tiny", comparison, "docs/results/tiny.md")


def test_rows_put_the_supervised_baseline_first_within_a_label_budget():
    records = [_record(1, 70.0, method="dust", labeled_patients=14), _record(1, 60.0, labeled_patients=14),
               _record(1, 65.0, method="dust"), _record(1, 55.0)]
    rows = _rows(results_markdown(records, "T"), "Last checkpoint")
    assert [r.split(" | ")[:2] for r in rows] == [["| supervised", "7"], ["| dust", "7"], ["| supervised", "14"],
                                                  ["| dust", "14"]]


def test_benchmark_dry_run_skips_what_the_json_holds(tmp_path: Path, capsys):
    results = tmp_path / "results.json"
    # seed 1337 of the default protocol is recorded; seed 4242 only in the other precision, which does not count
    other = "fp32" if NATIVE_PRECISION == "bf16" else "bf16"
    results.write_text(json.dumps([_record(1337, 70.0, precision=NATIVE_PRECISION),
                                   _record(1337, 72.0, checkpoint="best", precision=NATIVE_PRECISION),
                                   _record(4242, 71.0, precision=other),
                                   _record(4242, 73.0, checkpoint="best", precision=other)]))
    argv = ["benchmark", "--methods", "supervised", "--labeled-patients", "7", "--seeds", "1337", "4242",
            "--json", str(results), "--markdown", str(tmp_path / "README.md"), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skip  supervised 7p seed 1337" in out and "run   supervised 7p seed 4242" in out
    assert (f"dust train --config configs/acdc/supervised.yaml --set labeled_patients=7 --set seed=4242 "
            f"--set bf16={NATIVE_BF16} --record {results}") in out
    assert "1 to run, 1 skipped" in out
    assert not (tmp_path / "README.md").exists()  # a dry run writes nothing


def test_an_fp32_protocol_runs_fp32_on_every_cpu_and_a_bf16_one_leaves_auto_alone(tmp_path: Path, capsys):
    results = tmp_path / "results.json"
    for protocol, config, pinned in (("la-cpu", "configs/la/supervised.yaml", "false"),
                                     ("acdc-cpu", "configs/acdc/supervised.yaml", NATIVE_BF16)):
        argv = ["benchmark", "--protocol", protocol, "--methods", "supervised", "--labeled-patients", "8",
                "--seeds", "1", "--json", str(results), "--markdown", str(tmp_path / "R.md"), "--dry-run"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert f"dust train --config {config} --set labeled_patients=8 --set seed=1 --set bf16={pinned} " in out
        assert "_bf16" not in out  # the pin is the protocol's, not a variant with run directories of its own


def test_benchmark_of_a_variant_skips_only_that_variant_and_keeps_its_own_run_dirs(tmp_path: Path, capsys):
    results = tmp_path / "results.json"
    variant = {"precision": NATIVE_PRECISION, "options": "batchnorm_recalibration_batches=50"}
    # seed 1337 is recorded at the plain protocol only, seed 2024 in the variant
    results.write_text(json.dumps([_record(1337, 70.0, precision=NATIVE_PRECISION),
                                   _record(1337, 72.0, checkpoint="best", precision=NATIVE_PRECISION),
                                   _record(2024, 71.0, **variant), _record(2024, 73.0, checkpoint="best", **variant)]))
    argv = ["benchmark", "--methods", "supervised", "--labeled-patients", "7", "--seeds", "1337", "2024",
            "--set", "batchnorm_recalibration_batches=50", "--json", str(results),
            "--markdown", str(tmp_path / "README.md"), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skip  supervised 7p seed 2024" in out and "run   supervised 7p seed 1337" in out
    # the variant's runs never share (and so never resume) the plain protocol's run directory
    run_dir = "runs/acdc/supervised_7p_seed1337_batchnorm_recalibration_batches-50"
    assert f"-> {run_dir}\n" in out
    assert (f"dust train --config configs/acdc/supervised.yaml --set labeled_patients=7 --set seed=1337 "
            f"--set batchnorm_recalibration_batches=50 --set run_dir={run_dir} --set bf16={NATIVE_BF16} "
            f"--record {results}") in out
    # what the benchmark sets itself is refused as a variant setting, with the reason
    assert main([*argv, "--set", "seed=3"]) == 2
    assert "--set 'seed=3'" in capsys.readouterr().err


def test_benchmark_unknown_method_is_one_clear_line(capsys):
    assert main(["benchmark", "--methods", "no_such_method", "--dry-run"]) == 2
    assert "no config for method 'no_such_method'" in capsys.readouterr().err


def _tiny_config(path: Path, data_dir: Path, runs: Path, method: str = "supervised") -> None:
    path.write_text(yaml.safe_dump({
        "method": method, "data_dir": str(data_dir.resolve()), "labeled_patients": 2,
        "patch_size": [32, 32], "channels": [4, 8, 16, 32, 64], "batch_size": 4, "iterations": 6, "val_every": 3,
        "threads": 1, "tensorboard": False, "progress": False,
        "run_dir": str(runs / "{method}_{labeled_patients}p_seed{seed}"),
    }))


def test_benchmark_runs_records_and_then_skips(tmp_path: Path, phantom_root: Path):
    configs = tmp_path / "configs"
    configs.mkdir()
    _tiny_config(configs / "supervised.yaml", phantom_root, tmp_path / "runs")
    protocol = Protocol("tiny", configs, tmp_path / "r.json", tmp_path / "README.md", "Tiny")
    jobs = plan_benchmark(protocol, ["supervised"], [2], [5], [])
    assert [j.done for j in jobs] == [False]
    new = run_benchmark(jobs, protocol)
    stored = json.loads(protocol.results_json.read_text())
    assert sorted(stored, key=lambda r: r["checkpoint"]) == sorted(new, key=lambda r: r["checkpoint"])
    assert {r["checkpoint"] for r in stored} == {"last", "best"}
    # each record carries the one `dust train` command that reproduces it
    assert {r["command"] for r in stored} == {
        f"dust train --config {configs / 'supervised.yaml'} --set labeled_patients=2 --set seed=5 "
        f"--set bf16={NATIVE_BF16} --record {protocol.results_json}"}
    row = f"| supervised | 2 | 6, val, {NATIVE_PRECISION}, bilinear, bilinear | 5 | 1 |"
    assert row in protocol.results_markdown.read_text()
    assert (tmp_path / "runs" / "supervised_2p_seed5" / "report.html").is_file()
    # what the benchmark logs after a run (e.g. the next run's command) stays out of that run's train.log
    logging.getLogger("dust").info("a line logged after the run")
    assert "a line logged after the run" not in (tmp_path / "runs" / "supervised_2p_seed5" / "train.log").read_text()
    again = plan_benchmark(protocol, ["supervised"], [2], [5], stored)
    assert [j.done for j in again] == [True]
    assert run_benchmark(again, protocol) == []
    # --force resumes the run directory (here: re-evaluates the finished run); the records keep the one command
    # that started it, not that command with its own overrides repeated after it
    forced = run_benchmark(again, protocol, force=True)
    assert again[0].resumes and {r["command"] for r in forced} == {r["command"] for r in stored}


def test_benchmark_jobs_side_by_side_record_every_run_and_report_a_failed_one(tmp_path: Path, phantom_root: Path):
    configs = tmp_path / "configs"
    configs.mkdir()
    _tiny_config(configs / "supervised.yaml", phantom_root, tmp_path / "runs")
    _tiny_config(configs / "mean_teacher.yaml", tmp_path / "missing", tmp_path / "runs", method="mean_teacher")
    protocol = Protocol("tiny", configs, tmp_path / "r.json", tmp_path / "README.md", "Tiny")
    jobs = plan_benchmark(protocol, ["supervised", "mean_teacher"], [2], [5, 6], [], threads=1)
    with pytest.raises(RunFailedError, match=r"2 of 4 benchmark runs failed.*mean_teacher.*console.log"):
        run_benchmark(jobs, protocol, parallel=2)
    # the runs that worked are recorded, each under the one command that reproduces it, thread count included
    stored = json.loads(protocol.results_json.read_text())
    assert sorted((r["seed"], r["checkpoint"]) for r in stored) == [(5, "best"), (5, "last"), (6, "best"), (6, "last")]
    assert {r["command"] for r in stored} == {
        f"dust train --config {configs / 'supervised.yaml'} --set labeled_patients=2 --set seed={s} --set threads=1 "
        f"--set bf16={NATIVE_BF16} --record {protocol.results_json}" for s in (5, 6)}
    assert "| supervised | 2 |" in protocol.results_markdown.read_text()
    # the failed run names its problem in its own console log
    assert "missing" in (tmp_path / "runs" / "mean_teacher_2p_seed5" / "console.log").read_text()


def test_runs_recording_at_the_same_time_lose_no_record(tmp_path: Path):
    # seeds run side by side finish together: every process reads, merges and rewrites the same JSON
    path = tmp_path / "results.json"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()  # all writers go at once (without the lock, about a third of the records get lost)
    procs = [ctx.Process(target=_add_records, args=(str(path), list(range(w * 40, w * 40 + 40)), start))
             for w in range(4)]
    for p in procs:
        p.start()
    time.sleep(5)  # let every process finish importing
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sorted(r["seed"] for r in json.loads(path.read_text())) == list(range(160))


def test_every_stored_command_names_the_precision_it_ran_at(tmp_path: Path):
    # `bf16: auto` picks bf16 or fp32 per machine: a stored command must say which, or it repeats another number
    auto = {**_record(1, 60.0), "command": "dust train --config c.yaml --set seed=1 --record r.json"}
    explicit = {**_record(2, 60.0), "command": "dust train --config c.yaml --set bf16=true --set seed=2"}
    fp32 = {**_record(3, 60.0), "precision": "fp32", "command": "dust train --config c.yaml --set seed=3"}
    stored = {r["seed"]: r["command"] for r in update_results(tmp_path / "r.json", [auto, explicit, fp32])}
    assert stored[1] == "dust train --config c.yaml --set seed=1 --set bf16=true --record r.json"
    assert stored[2] == explicit["command"]
    assert stored[3] == "dust train --config c.yaml --set seed=3 --set bf16=false"


@pytest.mark.parametrize("name", ["acdc-cpu", "la-cpu"])
def test_the_committed_tables_are_what_dust_results_writes_from_the_committed_records(name, tmp_path: Path):
    """README.md's side-by-side table and the protocol's results page are generated, never hand-edited or stale."""
    from dust.benchmark import get_protocol

    repo = Path(__file__).resolve().parents[1]
    protocol = get_protocol(name)
    records = json.loads((repo / protocol.results_json).read_text())
    page = replace(protocol, results_markdown=tmp_path / "page.md")
    page.write_results_page(records)
    assert (tmp_path / "page.md").read_text() == (repo / protocol.results_markdown).read_text()
    readme = tmp_path / "README.md"
    readme.write_text((repo / "README.md").read_text())
    replace_readme_table(readme, records, name, protocol.comparison, str(protocol.results_markdown))
    assert readme.read_text() == (repo / "README.md").read_text()
