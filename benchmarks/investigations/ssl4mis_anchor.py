"""SSL4MIS's own supervised 2D script at the CPU budget protocol, for the anchor of issue 2 ("76.0 val Dice").

dust does not ship SSL4MIS's code. This script does the two parts that are ours: it lays out the ACDC data the way
SSL4MIS's ``BaseDataSets`` reads it (training slices under ``data/slices/``; symbolic links, nothing copied),
and it reads the ``log.txt`` files the SSL4MIS script writes into one JSON (validation Dice every 200 iterations,
last and best), so its numbers sit beside dust's.

    python benchmarks/investigations/ssl4mis_anchor.py layout --data ../shared/data/ACDC --out /tmp/ssl4mis/data/ACDC
    # in an SSL4MIS checkout's code/ folder, with the edits below, for each seed:
    python train_fully_supervised_2D.py --root_path /tmp/ssl4mis/data/ACDC --exp ACDC/anchor --labeled_num 7 \\
        --max_iterations 4000 --batch_size 8 --patch 128 --val_patch 128 --seed 1337 --threads 1
    python benchmarks/investigations/ssl4mis_anchor.py summarize LOG.txt [LOG.txt ...] \\
        --out docs/results/diagnostics/ssl4mis_anchor.json

The SSL4MIS files used (HiLab-git/SSL4MIS): ``code/train_fully_supervised_2D.py`` and ``code/val_2D.py`` as of
commit f5b9b38c, ``code/dataloaders/dataset.py`` as of 34d78f41 (``BaseDataSets``, ``RandomGenerator``),
``code/networks/unet.py`` (``UNet``, bilinear decoder) and ``code/utils/losses.py`` (``DiceLoss``). Edits, none
of which touches the model, loss, optimiser, schedule, augmentation, sampling or metric:
- every ``.cuda()`` removed and ``pin_memory=False`` (a CPU run), ``torch.set_num_threads(--threads)`` at start
  (1, as dust's runs);
- ``--patch N`` / ``--val_patch N`` (ints) replace ``--patch_size`` (declared ``type=list``, so it cannot be set
  from the command line); the training script passes ``patch_size=[val_patch] * 2`` to ``test_single_volume``,
  which otherwise validates at its default 256 while the network trained at 128;
- ``torch.utils.tensorboard`` instead of ``tensorboardX``, no image summaries, no copy of the code tree into the
  run folder, the training loss logged every 50 iterations instead of every one, the seed in the run folder's
  name, and a ``result.json`` with the last and best Dice.
The data loader keeps SSL4MIS's 16 worker processes and ``worker_init_fn``, so its random augmentation stream is
SSL4MIS's, not dust's. The run is fp32 (SSL4MIS has no autocast).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

_VAL = re.compile(r"iteration (\d+) : mean_dice : ([0-9.]+) mean_hd95 : ([0-9.]+)")
_ARGS = re.compile(r"Namespace\((.*)\)")


def layout(data: Path, out: Path) -> None:
    """SSL4MIS's ACDC layout under ``out``: the two lists, volumes in ``data/``, slices in ``data/slices/``."""
    if not (data / "train_slices.list").is_file():
        raise SystemExit(f"{data}: no train_slices.list here; give the ACDC folder (SSL4MIS h5 layout)")
    (out / "data" / "slices").mkdir(parents=True, exist_ok=True)
    for name in ("train_slices.list", "val.list"):
        (out / name).write_text((data / name).read_text())
    for h5 in sorted((data / "data").glob("*.h5")):
        link = out / "data" / ("slices" if "_slice_" in h5.name else "") / h5.name
        if not link.exists():
            link.symlink_to(h5.resolve())
    print(f"{out}: {len(list((out / 'data' / 'slices').iterdir()))} slices, "
          f"{len(list((out / 'data').glob('*.h5')))} volumes")


def read_log(path: Path) -> dict:
    """The arguments and the validation curve of one SSL4MIS ``log.txt``."""
    text = path.read_text()
    curve = [{"iteration": int(i), "dice": round(100 * float(d), 3), "hd95": round(float(h), 3)}
             for i, d, h in _VAL.findall(text)]
    if not curve:
        raise SystemExit(f"{path}: no 'iteration N : mean_dice' lines; is this an SSL4MIS log.txt?")
    args = _ARGS.search(text)
    return {
        "log": str(path),
        "arguments": args.group(1) if args else "",
        "seed": int(re.search(r"seed=(\d+)", args.group(1)).group(1)) if args else None,
        "last_dice": curve[-1]["dice"],
        "last_iteration": curve[-1]["iteration"],
        "best_dice": max(c["dice"] for c in curve),
        "curve": curve,
    }


def summarize(logs: list[Path], out: Path) -> None:
    runs = [read_log(p) for p in logs]
    summary = {"runs": runs}
    for key in ("last_dice", "best_dice"):
        values = [r[key] for r in runs]
        summary[key] = {"mean": round(statistics.fmean(values), 2),
                        "std": round(statistics.pstdev(values), 2), "n": len(values)}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    for r in runs:
        print(f"seed {r['seed']}: last {r['last_dice']:.2f} (iteration {r['last_iteration']}), "
              f"best {r['best_dice']:.2f}")
    print(f"last {summary['last_dice']['mean']:.2f} ± {summary['last_dice']['std']:.2f}, "
          f"best {summary['best_dice']['mean']:.2f} ± {summary['best_dice']['std']:.2f} over {len(runs)} -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layout", help="SSL4MIS's ACDC folder layout, as symbolic links")
    p.add_argument("--data", type=Path, required=True, help="the ACDC folder (train_slices.list, val.list, data/)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("summarize", help="SSL4MIS log.txt files -> one JSON")
    p.add_argument("logs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "layout":
        layout(args.data, args.out)
    else:
        summarize(args.logs, args.out)


if __name__ == "__main__":
    main()
