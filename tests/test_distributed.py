"""Data-parallel training: two CPU processes (gloo) on the tiny phantom end with the same weights, rank 0 writes."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

# DUST (stage starts, offline pseudo-labels, snapshots) recording, on each rank, the labelled batches it drew
# and, at the last checkpoint (after the last step's buffer broadcast), its weights and pseudo-labels: files
# written by this test's probe, not by dust.
PROBE = '''
import os

import torch
import torch.distributed as dist

from dust.methods.dust import DUST


class ProbeDust(DUST):
    def train_step(self, batch, iteration):
        self.drawn = getattr(self, "drawn", []) + [batch["labeled_index"].tolist()]
        self.completed = iteration + 1
        return super().train_step(batch, iteration)

    def extra_state(self):
        state = super().extra_state()
        if getattr(self, "completed", 0) == sum(stage.iterations for stage in self.stages()):
            torch.save({"weights": self.networks["model"].state_dict(), "drawn": self.drawn,
                        "pseudo_labels": self.pseudo_labels, "order": self.order,
                        "launcher": os.environ.get("TORCHELASTIC_RUN_ID")},
                       os.path.join(os.environ["PROBE_DIR"], f"rank{dist.get_rank()}.pt"))
        return state
'''


def test_two_cpu_processes_train_dust_in_lockstep_and_only_rank0_writes(tmp_path: Path, phantom_root: Path,
                                                                         monkeypatch):
    from dust.cli.main import main
    from dust.engine.checkpoint import load_checkpoint

    (tmp_path / "probe_method.py").write_text(textwrap.dedent(PROBE))
    probes = tmp_path / "probes"
    probes.mkdir()
    run = tmp_path / "run"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({
        "method": "probe_method:ProbeDust", "data_dir": str(phantom_root.resolve()), "labeled_patients": 2,
        "patch_size": [32, 32], "channels": [4, 8, 16, 32, 64], "batch_size": 4, "unlabeled_batch_size": 4,
        "iterations": 10, "val_every": 5, "threads": 1, "tensorboard": True, "progress": False,
        "run_dir": str(run),
    }))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PROBE_DIR", str(probes))

    assert main(["train", "--nproc", "2", "--config", str(config)]) == 0

    rank0, rank1 = (torch.load(probes / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["launcher"] and rank0["launcher"] == rank1["launcher"]  # started by torchrun's launcher
    assert rank0["weights"].keys() == rank1["weights"].keys()
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])  # incl. BN stats
    assert rank0["drawn"] != rank1["drawn"]  # each rank trained on its own batches
    assert torch.equal(rank0["order"], rank1["order"])  # rank 0 ranked the pool, rank 1 received it
    assert all(torch.equal(a, b) for a, b in zip(rank0["pseudo_labels"], rank1["pseudo_labels"], strict=True))

    last = load_checkpoint(run / "checkpoints" / "iter_0000010.pt")
    assert all(torch.equal(v, rank0["weights"][k]) for k, v in last["networks"]["model"].items())
    assert len(last["rank_states"]) == 2  # so a resumed job continues each rank's data order

    # one writer: one TensorBoard file, each log line once, no other rank's leftovers
    assert len(list((run / "tensorboard").iterdir())) == 1
    lines = (run / "train.log").read_text().splitlines()
    assert len(lines) == len(set(lines)) and sum("): val Dice" in line for line in lines) == 2
    assert not [p for p in run.rglob(".*") if p.is_file()]  # no temp files
    assert (run / "results.json").is_file() and (run / "sample_uncertainty.csv").is_file()


@pytest.mark.slow
def test_nproc_through_torchrun_gives_the_job_of_ranks_started_by_hand(tmp_path: Path, phantom_root: Path):
    """`dust train --nproc 2` (torch.distributed.run) ends with the weights of two processes started by hand with
    the torchrun variables, as dust's own launcher started them before."""
    import socket
    import subprocess
    import sys

    from dust.cli.main import main
    from dust.engine.checkpoint import load_checkpoint

    def config(run: Path) -> Path:
        path = tmp_path / f"{run.name}.yaml"
        path.write_text(yaml.safe_dump({
            "method": "mean_teacher", "data_dir": str(phantom_root.resolve()), "labeled_patients": 2,
            "patch_size": [32, 32], "channels": [4, 8, 16, 32, 64], "batch_size": 2, "unlabeled_batch_size": 2,
            "iterations": 6, "val_every": 6, "threads": 1, "tensorboard": False, "progress": False,
            "run_dir": str(run)}))
        return path

    assert main(["train", "--nproc", "2", "--config", str(config(tmp_path / "torchrun"))]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "dust", "train", "--config", str(config(tmp_path / "by_hand"))]
    ranks = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    assert [p.wait(timeout=600) for p in ranks] == [0, 0]
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "iter_0000006.pt") for run in ("torchrun", "by_hand"))
    for name in ("model", "teacher"):
        assert all(torch.equal(v, b["networks"][name][k]) for k, v in a["networks"][name].items()), name
    assert a["history"] == b["history"]


# ---------------------------------------------------------------------------------------------- the helpers
def _helpers_on_two_ranks(rank: int, init_file: str) -> None:
    from dust.engine import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        a = torch.nn.Parameter(torch.zeros(2))
        b = torch.nn.Parameter(torch.zeros(3))
        c = torch.nn.Parameter(torch.zeros(1))  # no gradient on any rank: stays None
        a.grad = torch.full((2,), float(rank + 1))
        b.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank * 2)
        distributed.average_gradients([a, b, c])
        assert torch.equal(a.grad, torch.full((2,), 1.5)) and torch.equal(b.grad, torch.tensor([1.0, 2.0, 3.0]))
        assert c.grad is None

        conv = torch.nn.Conv2d(2, 4, 3).to(memory_format=torch.channels_last)
        bn = torch.nn.BatchNorm2d(4)
        torch.nn.init.constant_(conv.weight, float(rank))
        bn.running_mean.fill_(float(rank))
        bn.num_batches_tracked.fill_(rank + 5)
        distributed.broadcast_tensors([*conv.parameters(), *bn.buffers()])
        assert (conv.weight == 0).all() and conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert (bn.running_mean == 0).all() and int(bn.num_batches_tracked) == 5

        losses = {"sup": torch.tensor(1.0 + rank), "unsup": torch.tensor(float("nan") if rank else 0.5)}
        mean = distributed.mean_over_ranks(losses)
        assert float(mean["sup"]) == 1.5 and torch.isnan(mean["unsup"])  # a NaN on rank 1 stops rank 0 too

        assert distributed.all_gather_objects({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
        assert distributed.broadcast_object(f"from {rank}") == "from 0"
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_and_rank0_state_is_broadcast(tmp_path: Path):
    mp.spawn(_helpers_on_two_ranks, args=(str(tmp_path / "init"),), nprocs=2)


def test_sync_batchnorm_is_refused_on_cpu(tiny_cfg):
    from dust.config import ConfigError
    from dust.engine.distributed import Ranks, prepare_networks
    from dust.methods.loading import build_method

    cfg = tiny_cfg(sync_batchnorm=True)
    method = build_method(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="sync_batchnorm.*CUDA"):
        prepare_networks(method, cfg, Ranks(rank=0, world_size=2), torch.device("cpu"))
