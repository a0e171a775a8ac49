"""The CUDA path, on a GPU machine: training in bf16 autocast with channels_last_3d, checkpoints written from the GPU
loading on the CPU, the device names. Skipped without CUDA; `benchmarks/gpu_check.py` runs them (`pytest -m cuda`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dust.config import ConfigError
from dust.engine.trainer import Trainer
from dust.methods.loading import load_trained, pick_device

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_devices_are_picked_and_an_absent_index_refused():
    assert pick_device("auto").type == "cuda" and pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="CUDA device"):
        pick_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("method", ["supervised", "mcf", "multicure", "dust"])
def test_a_3d_method_trains_on_the_gpu_in_bf16_and_its_checkpoint_predicts_on_the_cpu(method, tiny_cfg_3d):
    cfg = tiny_cfg_3d(method=method, device="cuda", bf16=True, iterations=9 if method == "dust" else 2)
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda"
    trainer.fit()
    assert all(p.device.type == "cuda" for p in trainer.method.parameters())
    best = Path(cfg["run_dir"]) / "checkpoints" / "best.pt"
    on_cpu, loaded = load_trained(best, "cpu")  # tensors saved from the GPU, config saying device: cuda
    assert loaded["device"] == "cpu" and all(p.device.type == "cpu" for p in on_cpu.parameters())
    on_gpu, _ = load_trained(best, "cuda")
    x = torch.rand(1, 1, 16, 16, 16)
    for net in (*on_cpu.networks.values(), *on_gpu.networks.values()):
        net.eval()
    with torch.no_grad():
        cpu, gpu = on_cpu.predict(x), on_gpu.predict(x.cuda()).cpu()
    assert torch.allclose(torch.softmax(cpu, 1), torch.softmax(gpu, 1), atol=1e-3)


def test_a_2d_run_on_the_gpu_evaluates_like_one_on_the_cpu(tiny_cfg, tmp_path: Path):
    gpu = tiny_cfg(device="cuda", bf16=False, iterations=4, val_every=4, run_dir=str(tmp_path / "gpu"))
    Trainer(gpu).fit()
    from dust.engine.evaluation import evaluate_checkpoint

    best = tmp_path / "gpu" / "checkpoints" / "best.pt"
    on_gpu = evaluate_checkpoint(best, "val", None, tmp_path / "a", device="cuda")
    on_cpu = evaluate_checkpoint(best, "val", None, tmp_path / "b", device="cpu")
    assert abs(on_gpu["overall"]["dice"]["mean"] - on_cpu["overall"]["dice"]["mean"]) < 1e-3
