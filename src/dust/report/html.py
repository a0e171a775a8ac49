"""One self-contained HTML page per report: tables, and figures embedded as base64 PNG data URIs.

The page needs no network and no script; it opens from disk in any browser.
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
from collections.abc import Sequence
from pathlib import Path

from dust import __version__
from dust.config import resolve_data_dir
from dust.data import load_split, unlabelled_thumbnails
from dust.data.types import DataError, Volume
from dust.report import figures
from dust.report.predictions import SlicePredictor, largest_slice, pick_slices
from dust.report.run import CHECKPOINT_TAGS, RunRecord, load_run

log = logging.getLogger("dust")

# (key in the metrics files, column title, scale): Dice/Jaccard are stored as fractions, shown in percent
METRICS = (("dice", "Dice (%)", 100.0), ("jaccard", "Jaccard (%)", 100.0), ("hd95_vox", "HD95 (vox)", 1.0),
           ("asd_vox", "ASD (vox)", 1.0))
THUMBNAILS = 5  # easiest and hardest unlabelled slices shown for DUST runs

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1150px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; text-align: center; } tr.overall td { font-weight: bold; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.6em; font-size: 0.8em; max-height: 30em; overflow: auto; }
.note { color: #665; font-size: 0.9em; } .wide { max-width: 100%; overflow-x: auto; }
.scroll { max-height: 26em; overflow: auto; display: inline-block; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], table_id: str,
           row_classes: Sequence[str] | None = None, groups: Sequence[tuple[str, int]] = ()) -> str:
    """A table; ``groups`` adds a first header row of (title, number of columns spanned)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    if groups:
        spans = "".join(f'<th colspan="{n}">{_e(title)}</th>' for title, n in groups)
        head = f"{spans}</tr><tr>{head}"
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _stat(entry: dict | None, scale: float) -> str:
    """``mean ± std`` over cases from a metrics summary entry."""
    if entry is None:
        return "–"
    return f"{entry['mean'] * scale:.2f} ± {entry['std'] * scale:.2f}"


def _value(value: float | None, scale: float) -> str:
    return "–" if value is None else f"{value * scale:.2f}"


def best_iteration(run: RunRecord) -> int | None:
    """The iteration best.pt was saved at: the first validation check with the highest Dice."""
    if not run.history:
        return None
    return max(run.history, key=lambda h: h["dice"])["iteration"]  # max keeps the first of equal values


class ReportBuilder:
    """Collects the sections of one report; loads volumes and trained methods once each."""

    def __init__(self, runs: Sequence[RunRecord], slices_per_case: int) -> None:
        self.runs = list(runs)
        self.slices_per_case = slices_per_case
        self._volumes: dict[tuple[Path, str], dict[str, Volume] | None] = {}
        self._predictors: dict[Path, SlicePredictor] = {}

    # ------------------------------------------------------------------ shared loading
    def volumes(self, run: RunRecord) -> dict[str, Volume] | None:
        """The run's validation volumes by case id, or None (with a note) when its data is not here."""
        root = resolve_data_dir(run.cfg["data_dir"])
        key = (root, run.cfg["val_split"])
        if key not in self._volumes:
            try:
                vols = load_split(run.cfg, root, run.cfg["val_split"])
                self._volumes[key] = {v.case_id: v for v in vols}
            except DataError as err:
                self._volumes[key] = None
                log.warning("report: no overlays for %s: %s", run.run_dir, err)
        if self._volumes[key] is None:
            run.notes.append(f"overlays left out: the data of this run ({root}) cannot be read here; run the "
                             "report from the directory the run was started in, or set DUST_DATA")
        return self._volumes[key]

    def predictor(self, run: RunRecord) -> SlicePredictor | None:
        checkpoint = run.weights.get("last", run.weights.get("best"))
        if checkpoint is None:
            return None
        if checkpoint not in self._predictors:
            self._predictors[checkpoint] = SlicePredictor(checkpoint)
        return self._predictors[checkpoint]

    # ------------------------------------------------------------------ one run
    def metric_table(self, run: RunRecord, index: int) -> str:
        tags = [t for t in CHECKPOINT_TAGS if t in run.summaries]
        best_it = best_iteration(run)
        names = {"last": "last", "best": f"best (it. {best_it})" if best_it is not None else "best"}
        header = ["class"] + [names[t] for _ in METRICS for t in tags]
        groups = [("", 1)] + [(title, len(tags)) for _, title, _ in METRICS]
        rows, classes = [], []
        for name in [*run.class_names, "mean"]:
            cells: list[object] = [name]
            for key, _, scale in METRICS:
                for tag in tags:
                    summary = run.summaries[tag]
                    entry = summary["overall"] if name == "mean" else summary["per_class"][name]
                    cells.append(_stat(entry.get(key), scale))
            rows.append(cells)
            classes.append("overall" if name == "mean" else "")
        n_cases = next(iter(run.summaries.values()))["n_cases"]
        return (f"<p>{n_cases} {_e(run.cfg['val_split'])} volumes; mean ± std over volumes (the mean row: over "
                "volumes of each volume's mean over classes).</p>"
                + _table(header, rows, f"metrics-{index}", classes, groups))

    def case_table(self, run: RunRecord, index: int, tag: str) -> str:
        cases = sorted(run.cases[tag], key=lambda c: c.dice)
        header = ["case", "Dice (%)", *[f"Dice {n}" for n in run.class_names], "HD95 (vox)", "ASD (vox)"]
        rows = [[c.case_id, _value(c.dice, 100), *[_value(c.per_class[n]["dice"], 100) for n in run.class_names],
                 _value(c.mean("hd95_vox"), 1), _value(c.mean("asd_vox"), 1)] for c in cases]
        return f'<div class="scroll">{_table(header, rows, f"cases-{index}")}</div>'

    def case_figures(self, run: RunRecord, tag: str) -> str:
        volumes, predictor = self.volumes(run), self.predictor(run)
        if volumes is None or predictor is None:
            return ""
        cases = sorted(run.cases[tag], key=lambda c: c.dice)
        picks = [("worst", cases[0]), ("best", cases[-1])] if len(cases) > 1 else [("only", cases[0])]
        parts = []
        for which, case in picks:
            volume = volumes.get(case.case_id)
            if volume is None:
                run.notes.append(f"case {case.case_id} is not in the data found here; its overlay is left out")
                continue
            slices = predictor.predict(volume, pick_slices(volume.label, self.slices_per_case))
            title = f"{which} case: {case.case_id}, Dice {case.dice * 100:.2f} % ({tag} checkpoint)"
            parts.append(_img(figures.case_overlays(title, slices, int(run.cfg["num_classes"])), title))
        return "".join(parts)

    def sample_uncertainty_section(self, run: RunRecord) -> str:
        rows = run.sample_uncertainty
        parts = [
            "<h3>Sample uncertainty of the unlabelled pool</h3>",
            "<p>DUST Eq. 1: disagreement of the pre-training snapshots on each unlabelled slice "
            "(<code>sample_uncertainty.csv</code>). Stage 1 trains on the reliable (lowest) part; the hardest "
            "slices are the ones worth annotating next.</p>",
            _img(figures.sample_uncertainty_histogram(rows), "sample uncertainty histogram"),
        ]
        kind = "volumes (middle axial slice)" if len(run.cfg["patch_size"]) == 3 else "slices"
        ordered = sorted(rows, key=lambda r: r.rank)
        ends = [("easiest", ordered[:THUMBNAILS]), ("hardest", ordered[-THUMBNAILS:][::-1])]
        root = resolve_data_dir(run.cfg["data_dir"])
        try:
            for which, picked in ends:
                ids = [r.image_id for r in picked]
                titles = [f"rank {r.rank}\n{r.image_id}\nu = {r.uncertainty:.3g}" for r in picked]
                parts.append(f"<h4>{which} {len(picked)} unlabelled {kind}</h4>")
                parts.append(_img(figures.thumbnails(titles, unlabelled_thumbnails(run.cfg, root, ids)),
                                  f"{which} unlabelled {kind}"))
        except DataError as err:
            run.notes.append(f"thumbnails of unlabelled slices left out: {err}")
        for path in sorted((run.run_dir / "figures").glob("*_pseudo_labels.png")):
            parts.append(f"<details><summary>{_e(path.name)}: pseudo-labels and uncertainty at the start of "
                         f"{_e(path.stem.split('_')[0])} (written during training)</summary>"
                         f"{_img(path.read_bytes(), path.stem)}</details>")
        return "".join(parts)

    def run_section(self, run: RunRecord, index: int) -> str:
        cfg = run.cfg
        parts = [f'<section id="run-{index}"><h2>{_e(run.label)}</h2>',
                 f"<p>run directory <code>{_e(run.run_dir)}</code>; method <b>{_e(cfg['method'])}</b>, "
                 f"{cfg['labeled_patients']} labelled patients, seed {cfg['seed']}, {run.total_iterations} "
                 f"iterations, stages: {_e(', '.join(f'{n} from {b}' for n, b in run.stage_starts))}</p>",
                 f"<details><summary>config.yaml</summary><pre>{_e((run.run_dir / 'config.yaml').read_text())}"
                 "</pre></details>"]
        if run.summaries:
            parts += ["<h3>Metrics per class</h3>", self.metric_table(run, index)]
        parts += ["<h3>Training curves</h3>", _img(figures.training_curves(run), "training curves")]
        tag = next((t for t in CHECKPOINT_TAGS if t in run.cases), None)
        if tag is not None:
            parts += [f"<h3>Per case ({tag} checkpoint), worst first</h3>", self.case_table(run, index, tag),
                      "<h3>Best and worst case</h3>", self.case_figures(run, tag)]
        if run.sample_uncertainty:
            parts.append(self.sample_uncertainty_section(run))
        if run.notes:
            parts.append('<ul class="note">' + "".join(f"<li>{_e(n)}</li>" for n in dict.fromkeys(run.notes))
                         + "</ul>")
        return "".join(parts) + "</section>"

    # ------------------------------------------------------------------ several runs
    def comparison_section(self) -> str:
        runs = self.runs
        class_names = runs[0].class_names
        header = ["run", "method", "labelled patients", "seed", "iterations", "Dice last", "Dice best",
                  "Jaccard last", "HD95 last", "ASD last", *[f"{n} Dice last" for n in class_names]]
        rows = []
        for run in runs:
            last, best = run.summaries.get("last"), run.summaries.get("best")
            row: list[object] = [run.run_dir.name, run.cfg["method"], run.cfg["labeled_patients"], run.cfg["seed"],
                                 run.total_iterations]
            row.append(_stat(last["overall"]["dice"], 100) if last else "–")
            row.append(_stat(best["overall"]["dice"], 100) if best else "–")
            for key, _, scale in METRICS[1:]:
                row.append(_stat(last["overall"][key], scale) if last else "–")
            for name in class_names:
                entry = last["per_class"].get(name) if last else None
                row.append(_value(entry["dice"]["mean"], 100) if entry else "–")
            rows.append(row)
        parts = ['<section id="comparison"><h2>Comparison</h2>',
                 "<p>Mean ± std over validation volumes (per class: the mean); Dice/Jaccard in %, HD95/ASD in "
                 "voxels.</p>",
                 f'<div class="wide">{_table(header, rows, "comparison-table")}</div>',
                 _img(figures.validation_comparison(runs), "validation Dice of every run")]
        parts.append(self.comparison_overlay())
        return "".join(parts) + "</section>"

    def comparison_overlay(self) -> str:
        """The same slice under every run: the case on which the runs disagree most (spread of mean Dice)."""
        per_run = [{c.case_id: c.dice for c in run.cases.get("last", run.cases.get("best", []))} for run in self.runs]
        common = set.intersection(*(set(d) for d in per_run))
        if not common:
            return '<p class="note">The runs share no evaluated case: no side-by-side overlay.</p>'
        case_id = max(sorted(common), key=lambda c: max(d[c] for d in per_run) - min(d[c] for d in per_run))
        predictions = []
        for run in self.runs:
            volumes, predictor = self.volumes(run), self.predictor(run)
            volume = None if volumes is None else volumes.get(case_id)
            if volume is None or predictor is None:
                return f'<p class="note">Case {_e(case_id)} cannot be predicted for {_e(run.label)} here.</p>'
            predictions.append(predictor.predict(volume, [largest_slice(volume.label)])[0])
        labels = [f"{run.run_dir.name}\nDice {d[case_id] * 100:.1f} %"
                  for run, d in zip(self.runs, per_run, strict=True)]
        title = f"same slice, every run (case {case_id}: where the runs differ most)"
        return (f"<h3>{_e(title)}</h3>"
                + _img(figures.method_comparison(labels, predictions, int(self.runs[0].cfg["num_classes"])), title))


def write_report(run_dirs: Sequence[Path | str], out: Path | str, slices_per_case: int = 3) -> Path:
    """Write one self-contained HTML report on one or more run directories; returns its path."""
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ValueError("a report needs at least one run directory")
    builder = ReportBuilder(runs, slices_per_case)
    sections = [builder.comparison_section()] if len(runs) > 1 else []
    sections += [builder.run_section(run, i) for i, run in enumerate(runs)]
    title = "dust report: " + ", ".join(run.label for run in runs)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>dust report</h1>"
            f'<p class="note">dust {__version__}, written {stamp}; Dice and Jaccard in %, HD95 and ASD in voxels. '
            "<code>last</code> is the final weights (the headline); <code>best</code> is selected on the same "
            "validation set, so optimistic.</p>" + "".join(sections) + "</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
