"""Benchmark records (``docs/results/*.json``) and the Markdown table generated from them.

A record is one evaluation of one trained run: method, labelled patients, seed, checkpoint (last/best), the
overall and per-class metrics (Dice/Jaccard in percent, HD95/ASD in voxels), training time and the exact command.
"""

from __future__ import annotations

import json
import platform
import shlex
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dust.config import BASE_DEFAULTS
from dust.methods import get_method
from dust.models import model_family
from dust.storage import atomic_write_text

# Pipeline choices that change the numbers are part of a record's identity (and of its table row).
IDENTITY = (
    "method", "labeled_patients", "seed", "iterations", "split", "checkpoint", "precision", "resize", "decoder",
    "options",
)
# Engine keys that change a run's numbers without being one of the identity's own columns.
NUMBER_CHANGING_ENGINE_OPTIONS = ("batchnorm_recalibration_batches", "inference_overlap", "inference_stride",
                                  "inference_blend", "foreground_oversample", "empty_mask_policy",
                                  "supervised_batch", "optimizer", "lr_schedule")
_METRICS = (("dice", 100.0), ("jaccard", 100.0), ("hd95_vox", 1.0), ("asd_vox", 1.0))


def identity_of(cfg: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The identity fields of the record a run of ``cfg`` writes for ``checkpoint`` (every key of IDENTITY)."""
    return {
        "method": str(cfg["method"]),
        "labeled_patients": int(cfg["labeled_patients"]),
        "seed": int(cfg["seed"]),
        "iterations": int(cfg["iterations"]),
        "split": cfg["val_split"],
        "checkpoint": checkpoint,
        "precision": precision_of(cfg),
        "resize": cfg["image_interpolation"] if cfg["spatial_policy"] == "resize" else "crop",
        "decoder": decoder_of(cfg),
        "options": options_of(cfg),
    }


def precision_of(cfg: dict[str, Any]) -> str:
    """``bf16`` or ``fp32``: what a resolved config trains and evaluates in."""
    return "bf16" if cfg["bf16"] else "fp32"


def decoder_of(cfg: dict[str, Any]) -> str:
    """The decoder upsampling of the network the run's method builds: ``deconv``, ``bilinear`` (``trilinear``) or
    both (``deconv+bilinear``: two decoders, as DUST's and MC-Net's networks)."""
    _, variant = model_family(str(cfg["model"]), len(cfg["patch_size"]))
    variant = getattr(get_method(str(cfg["method"])), "model_variant", None) or variant  # methods that fix it
    if variant == "dual":
        return "deconv+" + ("bilinear" if len(cfg["patch_size"]) == 2 else "trilinear")
    return str(cfg["upsample"])


def options_of(cfg: dict[str, Any]) -> str:
    """The method's own options (its ``defaults``) and the engine options of NUMBER_CHANGING_ENGINE_OPTIONS that
    the run changed, e.g. ``restart_lr_per_stage=False``.

    Empty for a run at the defaults. Part of the identity, so an ablation never replaces (or is averaged
    with) the default method's record.
    """
    defaults = {**{k: BASE_DEFAULTS[k] for k in NUMBER_CHANGING_ENGINE_OPTIONS},
                **get_method(str(cfg["method"])).defaults}
    options = [f"{k}={cfg[k]}" for k in sorted(defaults) if k in cfg and cfg[k] != defaults[k]]
    if cfg.get("dataset") == "prepared_3d":  # the own-data path beside a benchmark's own reader: never one row
        options.insert(0, "dataset=prepared_3d")
    return " ".join(options)


def record_key(record: dict) -> tuple:
    """What makes two records the same measurement (a newer one replaces an older one)."""
    return tuple(record.get(k) for k in IDENTITY)


def make_record(cfg: dict[str, Any], summary: dict, checkpoint: str, train_seconds: float, command: str) -> dict:
    overall = summary["overall"]
    record = identity_of(cfg, checkpoint)
    for key, scale in _METRICS:
        record[key] = round(overall[key]["mean"] * scale, 3)
    record["per_class"] = {
        name: {key: round(vals[key]["mean"] * scale, 3) for key, scale in _METRICS}
        for name, vals in summary["per_class"].items()
    }
    record["train_seconds"] = round(train_seconds, 1)
    record["command"] = command
    record["cpu"] = cpu_model()
    return record


def cpu_model() -> str:
    """The CPU that wrote a record: kernels and summation order differ between CPUs (analysis.md, bf16 sections)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def pin_precision(command: str, precision: str) -> str:
    """``command`` with the precision it ran at written out (``--set bf16=true|false``) unless it already says.

    ``bf16: auto`` resolves per machine (bf16 on a CPU with native bf16, fp32 on an AVX2-only one), so a command
    that leaves it to ``auto`` would reproduce a record at another precision elsewhere. The override goes before
    ``--record`` so the command still reads in the usual order.
    """
    tokens = shlex.split(command)
    if not command or any(t.startswith(("bf16=", "--set=bf16=")) for t in tokens):
        return command
    pin = f"--set bf16={'true' if precision == 'bf16' else 'false'}"
    head, sep, tail = command.partition(" --record ")
    return f"{head} {pin}{sep}{tail}"


def update_results(path: Path, records: list[dict]) -> list[dict]:
    """Add records to a results JSON, replacing earlier records with the same identity.

    Every command in the file names its precision (:func:`pin_precision`), also those of records written
    before dust did that.

    Runs finishing at the same moment (several seeds side by side) take turns through a lock file, and the
    JSON is replaced atomically, so no record is lost and a reader never sees half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        existing = json.loads(path.read_text()) if path.is_file() else []
        keys = {record_key(r) for r in records}
        kept = [r for r in existing if record_key(r) not in keys]
        merged = [{**r, "command": pin_precision(r["command"], r["precision"])} for r in kept + records]
        merged.sort(key=lambda r: tuple(str(r.get(k)) for k in IDENTITY))
        atomic_write_text(json.dumps(merged, indent=1) + "\n", path)
    return merged


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; the atomic replace still prevents torn files
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Identity keys that are not a table column of their own: together they name the protocol variant of a row.
_ROW_KEYS = ("method", "labeled_patients", "seed", "checkpoint")
_SETTING = tuple(k for k in IDENTITY if k not in _ROW_KEYS)


def group_over_seeds(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records that differ in nothing but their seed, keyed by the rest of the identity (in IDENTITY order).

    Variants of the protocol (fp32, nearest resize, another iteration budget...) are separate groups: only
    seeds of one and the same pipeline are averaged.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[tuple(r.get(k) for k in IDENTITY if k != "seed")].append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r["seed"])
    return dict(groups)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0) over seeds."""
    return float(np.mean(values)), float(np.std(values))


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def _row_order(rs: list[dict]) -> tuple:
    # labelled patients, then the supervised baseline first, then methods and settings alphabetically
    r = rs[0]
    return (r["labeled_patients"], r["method"] != "supervised", r["method"], *(str(r.get(k)) for k in _SETTING))


def _setting(r: dict) -> str:
    return ", ".join(str(r.get(k)) for k in _SETTING if r.get(k) not in (None, ""))


@dataclass(frozen=True)
class Comparison:
    """A protocol's side-by-side table: ``methods`` at each of ``labeled_patients``, all at one ``setting``.

    ``setting`` fixes identity fields (e.g. precision, options) so every row is measured the same way; the
    decoder is left to each method. A combination without records at the setting is listed as not measured,
    so a gap in the comparison shows instead of silently dropping a row. ``note`` says what the setting is
    and how to reproduce it (rendered above the table).
    """

    methods: tuple[str, ...]
    labeled_patients: tuple[int, ...]
    setting: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    analysis: str = "analysis.md"  # the hand-written page saying what the numbers mean (linked from the table)


def comparison_markdown(records: list[dict], comparison: Comparison) -> list[str]:
    """Lines of the side-by-side table (last checkpoint): mean ± std over seeds, and each method's Dice minus the
    supervised baseline's on the same seeds (same budget and setting)."""
    at_setting = [r for r in records if r["checkpoint"] == "last"
                  and all(r.get(k) == v for k, v in comparison.setting.items())]
    groups = group_over_seeds(at_setting)
    lines = ["| method | labelled patients | decoder | seeds | n | Dice | Δ Dice vs supervised, same seeds | Jaccard "
             "| HD95 | ASD |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in comparison.labeled_patients:
        rows = {m: [rs for rs in groups.values() if (rs[0]["method"], rs[0]["labeled_patients"]) == (m, n)]
                for m in comparison.methods}
        supervised = rows.get("supervised", [])
        baseline = {r["seed"]: r["dice"] for r in supervised[0]} if len(supervised) == 1 else {}
        for method, method_groups in rows.items():
            if not method_groups:
                lines.append(f"| {method} | {n} | | | 0 | not measured yet | | | | |")
            for rs in sorted(method_groups, key=lambda rs: str(rs[0]["decoder"])):
                cells = [_fmt([r[m] for r in rs]) for m, _ in _METRICS]
                lines.append(f"| {method} | {n} | {rs[0]['decoder']} | {', '.join(str(r['seed']) for r in rs)} | "
                             f"{len(rs)} | {cells[0]} | {_paired_delta(rs, baseline, method)} | "
                             + " | ".join(cells[1:]) + " |")
    return lines


def _paired_delta(rs: list[dict], baseline: dict[int, float], method: str) -> str:
    # Seeds fix the labelled/unlabelled split order and initialisation, so a difference taken seed by seed removes
    # the seed-to-seed spread the two rows share; a row compared on fewer seeds than it or the baseline has (one
    # seed beside a three-seed mean, or seeds the baseline lacks) says which seeds.
    if method == "supervised":
        return "reference"
    shared = [r for r in rs if r["seed"] in baseline]
    if not shared:
        return "no shared seed" if baseline else ""
    differences = [r["dice"] - baseline[r["seed"]] for r in shared]
    mean, std = mean_std(differences)
    cell = f"{mean:+.2f}" + (f" ± {std:.2f}" if len(differences) > 1 else "")
    if len(shared) < max(len(rs), len(baseline)):
        cell += f" (seed{'s' if len(shared) > 1 else ''} {', '.join(str(r['seed']) for r in shared)})"
    return cell


def results_markdown(records: list[dict], title: str, comparison: Comparison | None = None) -> str:
    """Table-1-style tables (mean ± std over seeds, last checkpoint as the headline, best separately),
    per-class Dice, and every command; first, with ``comparison``, the methods side by side at one setting."""
    groups = sorted(group_over_seeds(records).values(), key=_row_order)
    class_names = list(dict.fromkeys(c for r in records for c in r["per_class"]))
    plain = ", ".join(k for k in _SETTING if k != "options")
    setting_title = f"setting ({plain}; method options changed from their defaults)"
    lines = [
        f"# {title}",
        "",
        "Generated by `dust results` from the JSON beside this file; do not edit by hand.",
        f"Dice and Jaccard in %, HD95 and ASD in voxels; means over validation volumes and classes "
        f"({', '.join(class_names)}). Empty masks scored by dust's policy unless a row says otherwise (both empty:",
        "Dice 1, distance 0; one empty: Dice 0, distance = the image diagonal; [docs/metrics.md](../metrics.md)).",
        "Each row averages the runs that differ only in their seed: mean ± std over seeds (population std, ddof=0;",
        "one seed shows its value alone). A row with another setting (precision, resize, decoder, a method option",
        "...) is a variant of the protocol and is never averaged with it.",
    ]
    analysis = comparison.analysis if comparison is not None else "analysis.md"
    lines.append(f"What the numbers say, what was checked and what is still open: [{analysis}]({analysis}) "
                 "(hand-written).")
    if comparison is not None:
        lines += ["", "## Methods side by side (last checkpoint)", "", comparison.note, "",
                  *comparison_markdown(records, comparison), "",
                  "Every setting that was measured, variants and ablations included, follows."]
    for checkpoint, heading in (("last", "Last checkpoint (the final weights), every setting"),
                                ("best", "Best checkpoint (picked on the validation set: optimistic), every setting")):
        lines += [
            "", f"## {heading}", "",
            f"| method | labelled patients | {setting_title} | seeds | n | Dice | Jaccard | HD95 | ASD |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for rs in groups:
            if rs[0]["checkpoint"] != checkpoint:
                continue
            cells = [_fmt([r[m] for r in rs]) for m, _ in _METRICS]
            seeds = ", ".join(str(r["seed"]) for r in rs)
            lines.append(f"| {rs[0]['method']} | {rs[0]['labeled_patients']} | {_setting(rs[0])} | {seeds} | "
                         f"{len(rs)} | " + " | ".join(cells) + " |")
    lines += [
        "", "## Dice per class", "",
        f"| method | labelled patients | {setting_title} | checkpoint | n | "
        + " | ".join(f"Dice {c}" for c in class_names) + " |",
        "|---|---|---|---|---|" + "---|" * len(class_names),
    ]
    for checkpoint in ("last", "best"):
        for rs in groups:
            if rs[0]["checkpoint"] != checkpoint:
                continue
            per_class = [_fmt([r["per_class"][c]["dice"] for r in rs if c in r["per_class"]]) for c in class_names]
            lines.append(f"| {rs[0]['method']} | {rs[0]['labeled_patients']} | {_setting(rs[0])} | {checkpoint} | "
                         f"{len(rs)} | " + " | ".join(per_class) + " |")
    lines += [
        "", "## Commands", "",
        "Run from the repository root with `DUST_DATA=../shared/data` (the folder holding `ACDC/`). Each run writes",
        "both its `last` and `best` records. Training seconds are wall-clock on the machine that ran it (2 CPU",
        "cores here unless stated), including validation every 200 iterations; other work on the machine inflates",
        "them, so they are not a speed benchmark (see `benchmarks/`).", "",
    ]
    seen = set()
    for r in sorted(records, key=lambda r: (r["labeled_patients"], r["method"], r["seed"])):
        if r["command"] not in seen:
            seen.add(r["command"])
            lines.append(f"- {r['method']}, {r['labeled_patients']} patients, seed {r['seed']} [{_setting(r)}] "
                         f"({r['train_seconds']:.0f} s training{', ' + r['cpu'] if r.get('cpu') else ''}): "
                         f"`{r['command']}`")
    return "\n".join(lines) + "\n"


def readme_markers(protocol: str) -> tuple[str, str]:
    """The comments a README's generated table for ``protocol`` sits between."""
    return f"<!-- results-table:{protocol}:start -->", f"<!-- results-table:{protocol}:end -->"


def readme_table(records: list[dict], comparison: Comparison, results_page: str) -> str:
    """The project README's table: one row per method of ``comparison``, for each labelled count the last
    checkpoint's Dice (mean ± std over seeds, their number) and its paired difference to supervised, at the
    comparison's setting; ``results_page`` (every setting, every seed's command) is linked from the caption."""
    at_setting = [r for r in records if r["checkpoint"] == "last"
                  and all(r.get(k) == v for k, v in comparison.setting.items())]
    groups = list(group_over_seeds(at_setting).values())
    counts = comparison.labeled_patients
    lines = ["| method | " + " | ".join(f"{n} labelled: Dice | Δ vs supervised" for n in counts) + " |",
             "|---|" + "---|---|" * len(counts)]
    for method in comparison.methods:
        cells = []
        for n in counts:
            supervised = [rs for rs in groups if (rs[0]["method"], rs[0]["labeled_patients"]) == ("supervised", n)]
            baseline = {r["seed"]: r["dice"] for r in supervised[0]} if len(supervised) == 1 else {}
            mine = [rs for rs in groups if (rs[0]["method"], rs[0]["labeled_patients"]) == (method, n)]
            if not mine:
                cells += ["not run", ""]
                continue
            rs = max(mine, key=len)  # with several decoders measured, the one with the most seeds
            seeds = f"{len(rs)} seed{'s' if len(rs) > 1 else ''}"
            cells += [f"{_fmt([r['dice'] for r in rs])} ({seeds})", _paired_delta(rs, baseline, method)]
        if any(c not in ("not run", "") for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Every setting, per-class Dice and each seed's command: [{results_page}]({results_page}).")
    return "\n".join(lines)


def replace_readme_table(readme: Path, records: list[dict], protocol: str, comparison: Comparison,
                         results_page: str) -> None:
    """Rewrite the part of ``readme`` between ``protocol``'s results-table markers with :func:`readme_table`."""
    text = readme.read_text()
    start_marker, end_marker = readme_markers(protocol)
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: no '{start_marker}' ... '{end_marker}' markers to put the results table between")
    table = readme_table(records, comparison, results_page)
    text = text[: start + len(start_marker)] + "\n" + table + "\n" + text[end:]
    atomic_write_text(text, readme)
