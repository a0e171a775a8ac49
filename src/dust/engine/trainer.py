"""The one training loop. Methods fill in hooks; everything else happens here.

Per iteration: draw batches -> ``method.train_step`` under autocast -> sum of named losses -> finite check ->
backward -> optimiser step -> ``method.after_step`` -> ``step_end_hooks`` (timing tools). Every ``val_every``
iterations: validation Dice on whole volumes, best/iteration checkpoints (atomic), TensorBoard scalars and a line in
``train.log``.
Multi-stage methods describe stages as data (``Method.stages``); the loop calls ``on_stage_start`` at each
boundary and records the stage in checkpoints so a resumed run continues inside the right stage.
Started as one of several processes (torchrun, ``dust train --nproc``), it trains data-parallel through the
helpers in ``dust.engine.distributed``; ``self.is_main`` (rank 0) alone writes files.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dust import __version__
from dust.config import dump_config, format_run_dir, resolve_data_dir
from dust.data import TrainingData, load_training_data
from dust.data.sampler import Batch, TwoStreamSampler
from dust.engine import distributed
from dust.engine.checkpoint import iteration_checkpoints, load_latest, save_iteration_checkpoint
from dust.engine.errors import NonFiniteLossError
from dust.engine.evaluation import evaluate_volumes
from dust.engine.run_lock import lock_run_directory
from dust.methods import RunContext, Stage
from dust.methods.loading import build_method, pick_device
from dust.models.batchnorm import recalibrate_batchnorm
from dust.models.layers import to_channels_last
from dust.optim import lr_factor
from dust.storage import CheckpointError, atomic_save, check_compatible, check_writable_folder, load_network_weights

log = logging.getLogger("dust")
# what an iteration checkpoint holds beyond its weights and config, all of it needed to continue exactly
RESUME_KEYS = ("iteration", "started_stage", "optimizer", "sampler", "torch_rng", "best", "history", "train_log",
               "train_seconds", "method_state")


@dataclass
class StageSpan:
    stage: Stage
    index: int
    begin: int
    end: int
    schedule_begin: int  # where the current poly-LR schedule started
    schedule_end: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stage_spans(stages: list[Stage]) -> list[StageSpan]:
    spans, begin = [], 0
    for i, st in enumerate(stages):
        if st.iterations <= 0:
            raise ValueError(f"stage {st.name!r} has {st.iterations} iterations; every stage needs at least one")
        spans.append(StageSpan(st, i, begin, begin + st.iterations, 0, 0))
        begin += st.iterations
    sched_begin = 0
    for span in spans:
        if span.stage.restart_schedule:
            sched_begin = span.begin
        span.schedule_begin = sched_begin
    # a schedule runs until the next stage that restarts it (or the end of training)
    for span in spans:
        nxt = [s.begin for s in spans if s.begin > span.begin and s.stage.restart_schedule]
        span.schedule_end = nxt[0] if nxt else spans[-1].end
    return spans


def _add_to_window(window: dict[str, tuple[float, int]], values: dict[str, float]) -> None:
    """Add one step's values to a log window of (sum, count) per name; counted per name: a term may start
    mid-window."""
    for name, value in values.items():
        total, count = window.get(name, (0.0, 0))
        window[name] = (total + value, count + 1)


class _TqdmLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def setup_logging(run_dir: Path | None) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmLogHandler()
    console.setFormatter(fmt)
    console.addFilter(lambda record: not getattr(record, "file_only", False))  # loss lines: the bar shows them
    log.addHandler(console)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.propagate = False


def close_run_log() -> None:
    """Detach and close the run's ``train.log`` (console logging stays), so that what is logged after a run, e.g. a
    benchmark's next command, does not land in that run's log."""
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(h)
        h.close()


class Trainer:
    """Trains ``cfg["method"]`` on the configured data; ``fit()`` returns the best/last validation Dice."""

    def __init__(self, cfg: dict[str, Any], data: TrainingData | None = None) -> None:
        self.cfg = cfg
        if cfg["threads"]:
            torch.set_num_threads(int(cfg["threads"]))
        seed_everything(int(cfg["seed"]))
        # one of several processes under torchrun / --nproc: see dust.engine.distributed; else rank 0 of 1
        self.ranks = distributed.init_from_env(pick_device(cfg["device"]))
        self.is_main = self.ranks.is_main  # only the main process writes files
        self.device = distributed.rank_device(pick_device(cfg["device"]), self.ranks)
        self.run_dir = format_run_dir(cfg)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_lock = None
        # what this start creates (folders, log, lock, config) is removed again if the start fails
        made = [p for p in (*(self.run_dir / n for n in ("train.log", "run.lock", "config.yaml")), self.ckpt_dir,
                            self.run_dir, *self.run_dir.parents) if not p.exists()] if self.is_main else []
        try:
            self._start(cfg, data)
        except BaseException:
            self._undo_failed_start(made)
            raise

    def _undo_failed_start(self, made: list[Path]) -> None:
        """After a start that failed before training: no empty run folder is left behind, and a folder that was
        there before (e.g. a run being resumed) has what it had."""
        close_run_log()
        self.release_run_directory()
        for path in made:  # files first, then folders deepest first; a folder something else wrote into stays
            try:
                path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
            except OSError:
                break

    def _start(self, cfg: dict[str, Any], data: TrainingData | None) -> None:
        if self.is_main:
            check_writable_folder(self.run_dir)
            self.run_lock = lock_run_directory(self.run_dir)  # before anything is written: one process per run
            check_writable_folder(self.ckpt_dir)  # now, not when the first checkpoint is due
        setup_logging(self.run_dir if self.is_main else None)
        if not self.is_main:
            log.setLevel(logging.WARNING)  # one copy of the progress log, from rank 0
        if data is None:
            if cfg["generate_phantom"] and not self.is_main:
                distributed.barrier()  # rank 0 writes the phantom first
            data = load_training_data(cfg, resolve_data_dir(cfg["data_dir"]))
            if cfg["generate_phantom"] and self.is_main and self.ranks.enabled:
                distributed.barrier()
        self.data = data
        self.method = build_method(cfg, self.device)
        distributed.prepare_networks(self.method, cfg, self.ranks, self.device)
        if self.ranks.enabled:
            torch.manual_seed(int(cfg["seed"]) + self.ranks.rank)  # different dropout masks per rank
        self.sampler = TwoStreamSampler.from_config(self.data.labeled, self.data.unlabeled, cfg,
                                                    int(cfg["seed"]) + self.ranks.rank,
                                                    self.method.unlabeled_crop_margin())
        self.method.run = RunContext(
            data=self.data, run_dir=self.run_dir, checkpoint_dir=self.ckpt_dir, device=self.device,
            is_main=self.is_main, to_device=self.to_device, autocast=self.autocast,
            use_unlabeled=self.sampler.set_unlabeled_indices, set_pseudo_labels=self.sampler.set_pseudo_labels,
            recalibration_batches=self.recalibration_batches)
        self.optimizer = self._new_optimizer()
        self.spans = _stage_spans(self.method.stages())
        self.total_iterations = self.spans[-1].end
        self.iteration = 0
        self.started_stage = -1  # index of the last stage whose on_stage_start has run
        self.best = {"dice": -1.0, "iteration": -1}
        self.history: list[dict[str, float]] = []  # validation Dice per check
        self.train_log: list[dict[str, float]] = []  # mean loss terms per log window
        self.train_seconds = 0.0
        self.writer = None
        # timing and profiling tools: each is called with the iteration's index once its optimiser step (and, with
        # several ranks, the buffer broadcast) is done, so a tool never has to wrap a method's hooks
        self.step_end_hooks: list[Callable[[int], None]] = []

    # ------------------------------------------------------------------ helpers for methods
    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return to_channels_last(x) if self.cfg["channels_last"] else x

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg["bf16"]))

    def labeled_batch_size(self, stage: Stage) -> int:
        """Labelled items per step: ``batch_size``, or in a stage without unlabelled data (``supervised_batch:
        ssl``) as many items as a semi-supervised step has, ``batch_size + unlabeled_batch_size``."""
        if stage.uses_unlabeled or self.cfg["supervised_batch"] == "labeled":
            return int(self.cfg["batch_size"])
        return int(self.cfg["batch_size"]) + int(self.cfg["unlabeled_batch_size"])

    def current_span(self) -> StageSpan:
        for span in self.spans:
            if span.begin <= self.iteration < span.end:
                return span
        return self.spans[-1]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "dust-checkpoint",
            "dust_version": __version__,
            "method": self.cfg["method"],
            "num_classes": self.cfg["num_classes"],
            "config": self.cfg,
            "iteration": self.iteration,
            "started_stage": self.started_stage,
            "networks": {k: v.state_dict() for k, v in self.method.networks.items()},
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "best": dict(self.best),
            "history": list(self.history),
            "train_log": list(self.train_log),
            "train_seconds": self.train_seconds,
            "method_state": self.method.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        check_compatible(state, path, self.cfg["method"], self.cfg["num_classes"])
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:  # e.g. best.pt copied over an iteration checkpoint: weights, but no optimiser or data order
            raise CheckpointError(f"{path}: cannot resume from it: it lacks {', '.join(missing)} (best.pt holds "
                                  "weights for inference only; resume from an iter_*.pt)")
        load_network_weights(self.method.networks, state, path)
        self.started_stage = int(state["started_stage"])
        self.iteration = int(state["iteration"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint from before initial_lr: one group at the config's
            group.setdefault("initial_lr", self.cfg["lr"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if self.ranks.enabled or state.get("rank_states"):
            self._load_rank_state(state)
        self.best = dict(state["best"])
        self.history = list(state["history"])
        self.train_log = list(state["train_log"])
        self.train_seconds = float(state["train_seconds"])
        self.method.load_extra_state(state["method_state"])

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        """This rank's own sampler and RNG state; a job resumed with another process count re-seeds them."""
        saved = state.get("rank_states") or []
        if len(saved) == self.ranks.world_size:
            self.sampler.load_state_dict(saved[self.ranks.rank]["sampler"])
            torch.set_rng_state(saved[self.ranks.rank]["torch_rng"])
            return
        if self.is_main:
            log.warning("checkpoint written by %d process(es), resumed with %d: the data order differs from an "
                        "uninterrupted run", max(len(saved), 1), self.ranks.world_size)
        if self.ranks.rank > 0:  # rank 0 continues as the checkpoint's rank 0; the others draw afresh
            seed = int(self.cfg["seed"]) + self.ranks.rank + 1_000_003 * self.iteration
            self.sampler.reseed(seed)  # over rank 0's subsets, loaded above
            torch.manual_seed(seed)

    def resume(self) -> bool:
        """Continue from the newest readable checkpoint in the run directory, if any."""
        if self.is_main:  # temp files of writes cut short by a kill: never loaded, only clutter
            for partial in self.ckpt_dir.glob(".*.tmp"):
                partial.unlink(missing_ok=True)
        found = load_latest(self.ckpt_dir)
        if found is None:
            return False
        state, path = found
        self.load_state_dict(state, path)
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def save_best(self) -> None:
        if not self.is_main:
            return
        state = self.state_dict()
        for k in ("optimizer", "sampler", "torch_rng", "method_state"):
            state.pop(k)  # best.pt is for inference: weights + config
        atomic_save(state, self.ckpt_dir / "best.pt")

    # ------------------------------------------------------------------ the loop
    def _new_optimizer(self) -> torch.optim.Optimizer:
        """The method's optimiser, each parameter group's starting rate kept as ``initial_lr`` for the schedule."""
        optimizer = self.method.configure_optimizer()
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def _set_lr(self, span: StageSpan) -> float:
        """Every group's rate at this iteration: its starting rate times the schedule's factor; returns the first's."""
        done = (self.iteration - span.schedule_begin) / (span.schedule_end - span.schedule_begin)
        factor = lr_factor(done, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def validate(self) -> float:
        # several ranks: each scores a share of the volumes; a single process scores them all
        _, summary = evaluate_volumes(self.method, self.data.val, self.cfg, self.device, distances=False,
                                      sharded=True)
        return float(summary["overall"]["dice"]["mean"])

    def fit(self) -> dict[str, Any]:
        cfg, method = self.cfg, self.method
        if self.is_main:  # here, not in __init__: a refused resume leaves the run's record as it was
            dump_config(cfg, self.run_dir / "config.yaml")
        if cfg["tensorboard"] and self.is_main:
            from torch.utils.tensorboard import SummaryWriter  # imported late: costs ~1 s

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        method.on_train_start(method.run)
        log.info(
            "method %s | %d labelled / %d unlabelled items | %d val volumes | %d iterations | device %s",
            cfg["method"], len(self.data.labeled), len(self.data.unlabeled), len(self.data.val),
            self.total_iterations, self.device,
        )
        interactive = sys.stderr.isatty()  # in a log file, one progress line a minute is plenty
        bar = tqdm(total=self.total_iterations, initial=self.iteration, disable=not (cfg["progress"] and self.is_main),
                   dynamic_ncols=True, desc=str(cfg["method"]), mininterval=0.5 if interactive else 60)
        window: dict[str, tuple[float, int]] = {}  # loss terms: (sum, count) since the last log line
        diagnostics: dict[str, tuple[float, int]] = {}  # the method's Method.log values, likewise
        tic = time.perf_counter()
        while self.iteration < self.total_iterations:
            span = self.current_span()
            if span.index != self.started_stage:
                log.info("stage %d/%d %r begins at iteration %d (%d iterations)", span.index + 1,
                         len(self.spans), span.stage.name, self.iteration, span.stage.iterations)
                if span.stage.restart_schedule:
                    self.optimizer = self._new_optimizer()
                if self.is_main:  # several ranks: rank 0 alone (pseudo-labels, files), the others receive it
                    method.on_stage_start(span.stage, method.run)
                if self.ranks.enabled:
                    distributed.share_stage_start(method, self.sampler, self.ranks)
                self.started_stage = span.index
            lr = self._set_lr(span)
            for net in method.networks.values():
                net.train()
            drawn = self.sampler.next(span.stage.uses_unlabeled, self.labeled_batch_size(span.stage))
            batch = Batch({k: self.to_device(v) for k, v in drawn.items()})
            with self.autocast():
                losses = method.train_step(batch, self.iteration)
            loss = sum(losses.values())
            # several ranks: checked on the mean over ranks, so a NaN on one rank stops all of them together
            checked = distributed.mean_over_ranks(losses) if self.ranks.enabled else losses
            if not torch.isfinite(sum(checked.values())):
                bad = [k for k, v in checked.items() if not torch.isfinite(v)]
                saved = iteration_checkpoints(self.ckpt_dir)
                kept = (f"the last good checkpoint ({saved[0]}) is untouched" if saved else
                        "no checkpoint had been written yet (lower lr, or check the data)")
                raise NonFiniteLossError(
                    f"iteration {self.iteration}: loss term(s) {bad} are not finite; training stopped, {kept}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.ranks.enabled:
                distributed.average_gradients(p for g in self.optimizer.param_groups for p in g["params"])
            self.optimizer.step()
            method.after_step(self.iteration)
            if self.ranks.enabled:
                distributed.broadcast_buffers(method.networks)
            for hook in self.step_end_hooks:
                hook(self.iteration)
            self.iteration += 1
            bar.update(1)
            _add_to_window(window, {k: float(v.detach()) for k, v in {**losses, "loss": loss}.items()})
            _add_to_window(diagnostics, method.logged)
            method.logged = {}
            if self.iteration % cfg["log_every"] == 0:
                means = {k: total / count for k, (total, count) in window.items()}
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.5f}", refresh=interactive)
                self.scalars({f"train/{k}": v for k, v in means.items()} | {"train/lr": lr})
                self.scalars({k: total / count for k, (total, count) in diagnostics.items()})
                self.train_log.append({"iteration": self.iteration, **means})
                terms = ", ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
                log.info("iteration %d: loss %.4f (%s) lr %.5f", self.iteration, means["loss"], terms, lr,
                         extra={"file_only": True})  # every log_every iterations, into train.log
                window, diagnostics = {}, {}
            if self.iteration % cfg["val_every"] == 0 or self.iteration == self.total_iterations:
                self.train_seconds += time.perf_counter() - tic
                self._validate_and_checkpoint(span)
                tic = time.perf_counter()
        bar.close()
        if self.writer is not None:
            self.writer.close()
        distributed.barrier()  # rank 0's last checkpoint and best.pt are on disk before any rank reads them
        return {"best": self.best, "last_dice": self.history[-1]["dice"] if self.history else None}

    def release_run_directory(self) -> None:
        """Let another process use the run directory (the lock also ends with this process)."""
        if self.run_lock is not None:
            self.run_lock.close()
            self.run_lock = None

    def recalibration_batches(self) -> list[torch.Tensor]:
        """``batchnorm_recalibration_batches`` fresh batches of the images the method trains on now (labelled, plus
        the part of the unlabelled pool it uses), augmented as in training, on the device. They come from a sampler
        of their own, seeded by the iteration, so training draws and resumes exactly as without them."""
        source = TwoStreamSampler.from_config(self.data.labeled, self.data.unlabeled, self.cfg,
                                              int(self.cfg["seed"]) * 1_000_003 + self.iteration + self.ranks.rank)
        # the stage trained last (at a stage start: the one before it)
        stage = self.spans[max(self.started_stage, 0)].stage
        with_unlabeled = stage.uses_unlabeled and self.data.unlabeled is not None
        if with_unlabeled:  # the part of the pool in use now (e.g. DUST's reliable half: the rest has no labels yet)
            source.set_unlabeled_indices(self.sampler.unlabeled_indices)
        batches = []
        for _ in range(int(self.cfg["batchnorm_recalibration_batches"])):
            drawn = source.next(with_unlabeled, self.labeled_batch_size(stage))
            x = drawn["labeled_image"]
            if with_unlabeled:
                x = torch.cat([x, drawn["unlabeled_image"]])
            batches.append(self.to_device(x))
        return batches

    def recalibrate_batchnorm(self) -> None:
        """The method's BatchNorm running statistics re-estimated over :meth:`recalibration_batches`, dropout off."""
        recalibrate_batchnorm(self.method.networks, self.method.predict, self.recalibration_batches(), self.autocast())
        if self.ranks.enabled:  # every rank evaluates and checkpoints rank 0's statistics
            distributed.broadcast_buffers(self.method.networks)

    def _validate_and_checkpoint(self, span: StageSpan) -> None:
        if self.cfg["batchnorm_recalibration_batches"]:
            self.recalibrate_batchnorm()
        dice = self.validate()
        self.history.append({"iteration": self.iteration, "dice": dice, "stage": span.stage.name})
        self.scalars({"val/dice": dice})
        if dice > self.best["dice"]:
            self.best = {"dice": dice, "iteration": self.iteration}
            self.save_best()
        log.info("iteration %d (%s): val Dice %.4f (best %.4f at %d)", self.iteration, span.stage.name, dice,
                 self.best["dice"], self.best["iteration"])
        state = self.state_dict()
        if self.ranks.enabled:  # every rank's data order and RNG, so a resumed job continues each one
            state["rank_states"] = distributed.all_gather_objects(
                {"sampler": state["sampler"], "torch_rng": state["torch_rng"]})
        if self.is_main:
            save_iteration_checkpoint(state, self.ckpt_dir, self.iteration, self.cfg["keep_checkpoints"])

    def scalars(self, values: dict[str, float], step: int | None = None) -> None:
        """TensorBoard scalars at ``step`` (default: the number of completed iterations)."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, self.iteration if step is None else step)
