"""The HTML report as a user gets it: written at the end of `dust train`, by `dust report`, and opened in a
real browser (headless Chromium) with every image loading and no console error."""

from __future__ import annotations

import base64
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dust.cli.main import main
from dust.methods.loading import full_config
from dust.report import write_report
from dust.workflows import train

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Tables (by id: body rows of cell texts) and images (alt, src) of a report."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[tuple[str, str]] = []
        self._table: str | None = None
        self._in_body = self._in_cell = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_body:
            self._in_cell = True
            self.tables[self._table][-1].append("")
        elif tag == "img":
            self.images.append((a.get("alt", ""), a.get("src", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.tables[self._table][-1][-1] += data


def _tiny(phantom_root: Path, run_dir: Path, **overrides) -> dict:
    cfg = {
        "data_dir": str(phantom_root.resolve()), "labeled_patients": 2, "patch_size": [32, 32],
        "channels": [4, 8, 16, 32, 64], "batch_size": 4, "unlabeled_batch_size": 4, "iterations": 20,
        "val_every": 10, "log_every": 5, "threads": 1, "tensorboard": False, "progress": False,
        "run_dir": str(run_dir),
    }
    return full_config({**cfg, **overrides})


@pytest.fixture(scope="module")
def runs(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny DUST run and a tiny supervised run on the phantom, each with the report dust train writes."""
    root = tmp_path_factory.mktemp("report_runs")
    out = {}
    for method in ("dust", "supervised"):
        train(_tiny(phantom_root, root / method, method=method), command=f"dust train ({method})")
        out[method] = root / method
    return out


def _png_sizes(page: _Page) -> list[int]:
    sizes = []
    for _, src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:40]  # embedded: the page needs no network and no other file
        data = base64.b64decode(src[len(prefix):])
        assert data.startswith(PNG_MAGIC)
        sizes.append(len(data))
    return sizes


def test_train_writes_a_self_contained_report(runs: dict[str, Path]):
    run = runs["dust"]
    page = _Page((run / "report.html").read_text())
    assert [row[0] for row in page.tables["metrics-0"]] == ["RV", "Myo", "LV", "mean"]
    # the mean row holds the same Dice the run recorded for its last checkpoint
    last = next(r for r in json.loads((run / "results.json").read_text()) if r["checkpoint"] == "last")
    assert page.tables["metrics-0"][3][1].startswith(f"{last['dice']:.2f} ±")
    # per case, worst first: one row per validation volume, ascending mean Dice
    cases = page.tables["cases-0"]
    summary = json.loads((run / "metrics_val_last.json").read_text())
    assert len(cases) == summary["n_cases"]
    dice = [float(row[1]) for row in cases]
    assert dice == sorted(dice)
    alts = [alt for alt, _ in page.images]
    assert "training curves" in alts and "sample uncertainty histogram" in alts
    assert any(a.startswith("worst case") for a in alts) and any(a.startswith("best case") for a in alts)
    assert {"easiest unlabelled slices", "hardest unlabelled slices"} <= set(alts)
    assert min(_png_sizes(page)) > 1000


def test_report_compares_several_runs(runs: dict[str, Path], tmp_path: Path, capsys):
    out = tmp_path / "compare.html"
    assert main(["report", str(runs["supervised"]), str(runs["dust"]), "--out", str(out), "--slices", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    page = _Page(out.read_text())
    assert [row[1] for row in page.tables["comparison-table"]] == ["supervised", "dust"]
    assert any(alt.startswith("same slice, every run") for alt, _ in page.images)
    # each run keeps its own section; only the DUST run has the sample-uncertainty histogram
    assert "metrics-0" in page.tables and "metrics-1" in page.tables
    assert [alt for alt, _ in page.images].count("sample uncertainty histogram") == 1
    _png_sizes(page)


def test_report_evaluates_a_run_without_metrics_files(runs: dict[str, Path], tmp_path: Path):
    run = tmp_path / "copied"
    shutil.copytree(runs["supervised"], run)
    recorded = json.loads((run / "metrics_val_best.json").read_text())
    for path in run.glob("metrics_val_*"):
        path.unlink()
    write_report([run], run / "again.html")
    # the same weights evaluated again give the numbers training wrote
    assert json.loads((run / "metrics_val_best.json").read_text()) == recorded
    assert "computed for this report" in (run / "again.html").read_text()


def test_a_failing_report_keeps_the_run(phantom_root: Path, tmp_path: Path, monkeypatch):
    import dust.workflows

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dust.workflows, "write_report", broken)
    records = train(_tiny(phantom_root, tmp_path / "run", iterations=10, val_every=5))
    assert {r["checkpoint"] for r in records} == {"last", "best"}
    run = tmp_path / "run"
    assert (run / "results.json").is_file() and (run / "metrics_val_last.csv").is_file()
    assert not (run / "report.html").exists()
    log = (run / "train.log").read_text()
    assert "WARNING no report written" in log and "disk full" in log and "dust report" in log


def test_report_of_a_folder_that_is_no_run_is_one_clear_line(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no config.yaml" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_report_renders_in_headless_chromium(runs: dict[str, Path], tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((runs["dust"] / "report.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        assert len(images) >= 5
        assert all(complete and width > 0 for _, complete, width in images), images
        rows = driver.execute_script(
            "return Array.from(document.querySelectorAll('#metrics-0 tbody tr td:first-child'))"
            ".map(td => td.textContent)")
        assert rows == ["RV", "Myo", "LV", "mean"]
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        shot = base64.b64decode(driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"])
    finally:
        driver.quit()
    assert shot.startswith(PNG_MAGIC)
    (tmp_path / "report.png").write_bytes(shot)
    if os.environ.get("DUST_SCREENSHOT"):
        target = Path(os.environ["DUST_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shot)
