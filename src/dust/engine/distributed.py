"""Data-parallel training over several processes, with ``torch.distributed`` and no change to methods.

A job of N processes ("ranks") is started by ``torchrun --nproc_per_node=N -m dust train ...`` or by
``dust train --nproc N ...`` (:func:`launch`: torchrun's own launcher, ``torch.distributed.run``). The Trainer then:

- joins the process group named by the torchrun variables (gloo on CPU, nccl on CUDA, one GPU per rank);
- broadcasts every network's parameters and buffers from rank 0, so all ranks start from the same weights;
- after each backward, averages the gradients of the optimised parameters over ranks (one flat all-reduce):
  numerically what ``DistributedDataParallel`` does, without wrapping networks, so methods need no change;
- after each step, broadcasts rank 0's buffers (BatchNorm running statistics, also of networks that are not
  optimised, e.g. an EMA teacher), as DDP's ``broadcast_buffers`` does;
- seeds each rank's batch sampler with ``seed + rank``: ranks draw different batches, so one iteration sees
  N x ``batch_size`` labelled slices (N x ``unlabeled_batch_size`` unlabelled);
- runs stage starts (e.g. DUST's offline pseudo-labelling of the pool) on rank 0 only, then hands the result
  to the other ranks the way a resumed run receives it: networks, ``Method.extra_state()`` and the sampler's
  unlabelled subset (:func:`share_stage_start`);
- validates on a shard of the volumes per rank and gathers the per-case results, so every rank has the same
  metrics (``dust.engine.evaluation.evaluate_volumes``);
- writes files (checkpoints, logs, TensorBoard, metrics, results) on rank 0 only. Checkpoints hold every
  rank's sampler and RNG state, so a resumed job with the same N draws the batches it would have drawn.

``sync_batchnorm: true`` converts networks to ``nn.SyncBatchNorm`` (batch statistics over all ranks); PyTorch
implements it for GPUs only, so a CPU job refuses it.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from dust.config import ConfigError

if TYPE_CHECKING:
    from dust.data.sampler import TwoStreamSampler
    from dust.methods import Method

log = logging.getLogger("dust")

# Rank 0 alone pseudo-labels a whole pool at a stage start while the others wait in a broadcast.
_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job; a plain run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """The torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a single process without them."""
    try:
        return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err})") from None


def init_from_env(device: torch.device) -> Ranks:
    """Join the job's process group if this process was started as one of several ranks (idempotent)."""
    ranks = ranks_from_env()
    if ranks.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
    return ranks


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per rank on a node: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if ranks.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank)
    return device


# ---------------------------------------------------------------------------------------------- networks
def prepare_networks(method: Method, cfg: dict[str, Any], ranks: Ranks, device: torch.device) -> None:
    """SyncBatchNorm if asked, then every rank takes rank 0's weights."""
    if cfg["sync_batchnorm"] and ranks.enabled:
        if device.type != "cuda":
            raise ConfigError("sync_batchnorm: PyTorch's SyncBatchNorm runs on CUDA only; use it with "
                              "device: cuda, or set sync_batchnorm: false for a CPU job")
        for name, net in method.networks.items():
            method.networks[name] = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if ranks.enabled:
        broadcast_tensors([t for net in method.networks.values() for t in (*net.parameters(), *net.buffers())])


def _by_kind(tensors: Iterable[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values; one message per dtype."""
    for group in _by_kind(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src)
        _scatter_back(flat, group)


def broadcast_buffers(networks: dict[str, nn.Module]) -> None:
    broadcast_tensors([b for net in networks.values() for b in net.buffers()])


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (flattened into one all-reduce per dtype).

    Every rank must hold gradients for the same parameters, which is the case when all ranks run the same
    method code in the same stage.
    """
    world = dist.get_world_size()
    for group in _by_kind(p.grad for p in parameters if p.grad is not None).values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world
        _scatter_back(flat, group)


def _scatter_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape))  # copy_ keeps each tensor's own memory format
        offset += n


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each named scalar averaged over ranks: a NaN on any rank becomes a NaN on every rank."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(values, stacked, strict=True))


# ---------------------------------------------------------------------------------------------- objects
def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def share_stage_start(method: Method, sampler: TwoStreamSampler, ranks: Ranks) -> None:
    """After rank 0 ran ``on_stage_start``: the other ranks take its networks, method state and unlabelled subset.

    This is exactly the state a resumed run restores, so any method that resumes correctly also trains
    correctly on several ranks.
    """
    broadcast_tensors([t for net in method.networks.values() for t in (*net.parameters(), *net.buffers())])
    payload = ((method.extra_state(), sampler.unlabeled_indices, sampler.unlabeled_walk_restarted) if ranks.is_main
               else None)
    state, indices, restarted = broadcast_object(payload)
    if not ranks.is_main:
        method.load_extra_state(state)
        if restarted:  # rank 0's stream was (re)set to a new subset: start this rank's walk over it too
            sampler.set_unlabeled_indices(indices)


# ---------------------------------------------------------------------------------------------- launching
def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m dust <argv>`` as ranks 0..nproc-1 of one job on this machine through ``torch.distributed.run``
    (torchrun's own launcher: ``torchrun --standalone --nproc-per-node N -m dust <argv>``).

    Each rank gets ``cores / nproc`` threads unless ``OMP_NUM_THREADS`` is set. If one rank fails, torchrun stops
    the others; the exit status is the first failing rank's. No restarts (``--max-restarts 0``): a rank fails on a
    real error, and ``dust train --resume`` continues a job; for elastic restarts or several nodes, call torchrun
    yourself (docs/distributed.md).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0", "--module", "dust"])
    args.training_script_args = list(argv)  # set, not parsed: torchrun's parser would read dust's --nproc as its own
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = saved or str(max(1, (os.cpu_count() or 1) // nproc))  # the ranks inherit it
    try:
        run(args)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1  # a rank killed by a signal: a plain failure
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0
