"""The training engine: loss goes down, runs are reproducible, resume is exact, plug-in methods work."""

from __future__ import annotations

import contextlib
import functools
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dust.config
from dust.config import ConfigError
from dust.engine.checkpoint import CheckpointError, iteration_checkpoints, load_latest
from dust.engine.trainer import NonFiniteLossError, Trainer
from dust.methods.loading import full_config
from dust.models.batchnorm import recalibrate_batchnorm
from dust.workflows import train


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.method.networks["model"].state_dict().items()}


def test_short_training_lowers_the_loss(tiny_cfg):
    trainer = Trainer(tiny_cfg(iterations=60, val_every=60, log_every=10, lr=0.05))
    trainer.fit()
    first, last = trainer.train_log[0]["loss"], trainer.train_log[-1]["loss"]
    assert last < 0.8 * first, trainer.train_log


def test_same_config_and_seed_gives_the_same_weights(tiny_cfg, tmp_path: Path):
    a = Trainer(tiny_cfg(run_dir=str(tmp_path / "a")))
    a.fit()
    b = Trainer(tiny_cfg(run_dir=str(tmp_path / "b")))
    b.fit()
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.history == b.history


def test_a_timing_tool_sees_every_step_end_once_and_changes_nothing(tiny_cfg, tmp_path: Path):
    """Benchmarks time steps through ``Trainer.step_end_hooks``, not by wrapping a method's hooks."""
    plain = Trainer(tiny_cfg(iterations=12, val_every=6, run_dir=str(tmp_path / "plain")))
    plain.fit()
    timed = Trainer(tiny_cfg(iterations=12, val_every=6, run_dir=str(tmp_path / "timed")))
    seen: list[tuple[int, bool]] = []
    timed.step_end_hooks.append(lambda index: seen.append((index, bool(timed.optimizer.state_dict()["state"]))))
    timed.fit()
    assert seen == [(index, True) for index in range(12)]  # each iteration once, after its optimiser step
    wa, wb = _weights(plain), _weights(timed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("recalibration", [0, 3])
def test_resume_continues_from_the_saved_iteration_and_matches(tiny_cfg, tmp_path: Path, recalibration: int):
    tiny_cfg = functools.partial(tiny_cfg, batchnorm_recalibration_batches=recalibration)
    full = Trainer(tiny_cfg(run_dir=str(tmp_path / "full")))
    full.fit()
    interrupted = Trainer(tiny_cfg(run_dir=str(tmp_path / "cut"), iterations=20))
    interrupted.fit()
    # pretend the run was killed after iteration 10: drop the newer checkpoint
    newest = iteration_checkpoints(interrupted.ckpt_dir)[0]
    assert newest.name == "iter_0000020.pt"
    newest.unlink()
    resumed = Trainer(tiny_cfg(run_dir=str(tmp_path / "cut")))
    assert resumed.resume() and resumed.iteration == 10
    resumed.fit()
    assert resumed.iteration == 20
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)  # running statistics included
    assert full.history[-1] == resumed.history[-1]  # the same validation Dice at the end


def test_batchnorm_recalibration_changes_what_eval_sees_and_nothing_that_trains(tiny_cfg, tmp_path: Path):
    # heavy dropout: the train-time and test-time activation statistics differ
    heavy = {"dropout": [0.5] * 5, "iterations": 20}
    plain = Trainer(tiny_cfg(run_dir=str(tmp_path / "plain"), **heavy))
    plain.fit()
    recalibrated = Trainer(tiny_cfg(run_dir=str(tmp_path / "recal"), batchnorm_recalibration_batches=4, **heavy))
    recalibrated.fit()
    wp, wr = _weights(plain), _weights(recalibrated)
    learned = [k for k in wp if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(wp[k], wr[k]) for k in learned)  # the same training draws, the same weights
    assert not torch.equal(wp["encoder.blocks.4.5.running_var"], wr["encoder.blocks.4.5.running_var"])

    # the bottleneck's second BatchNorm now holds the statistics of its input with dropout off
    net = recalibrated.method.networks["model"]
    torch.manual_seed(0)
    batches = [torch.rand(4, 1, 32, 32) for _ in range(3)]
    seen = []
    hook = net.encoder.blocks[4][5].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    recalibrate_batchnorm(recalibrated.method.networks, recalibrated.method.predict, batches, contextlib.nullcontext())
    hook.remove()
    bn = net.encoder.blocks[4][5]
    by_batch = torch.stack([x.mean((0, 2, 3)) for x in seen])
    assert torch.allclose(bn.running_mean, by_batch.mean(0), atol=1e-5)  # the plain average over the batches
    assert not net.training and not bn.training  # left in eval mode


def test_corrupt_newest_checkpoint_falls_back_to_previous(tiny_cfg):
    trainer = Trainer(tiny_cfg())
    trainer.fit()
    newest, previous = iteration_checkpoints(trainer.ckpt_dir)[:2]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as after a crash mid-write without rename
    state, path = load_latest(trainer.ckpt_dir)
    assert path == previous and state["iteration"] == 10
    # moved aside, so the next rotation deletes nothing good to keep a bad file
    assert not newest.exists() and newest.with_name(newest.name + ".corrupt").exists()
    assert iteration_checkpoints(trainer.ckpt_dir) == [previous]


def test_resume_with_every_checkpoint_unreadable_stops_instead_of_starting_again(tiny_cfg):
    cfg = tiny_cfg()
    Trainer(cfg).fit()
    for path in iteration_checkpoints(Path(cfg["run_dir"]) / "checkpoints"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="all 2 checkpoint\\(s\\) are unreadable"):
        Trainer(cfg).resume()


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes_identically(tiny_cfg, monkeypatch, capsys):
    import errno

    from dust import storage

    cfg = tiny_cfg(iterations=20, val_every=10)
    reference = Trainer({**cfg, "run_dir": cfg["run_dir"] + "_reference"})
    reference.fit()
    real_fsync, real_mkstemp, writing = storage.os.fsync, storage.tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        writing.append(kwargs.get("prefix", ""))
        return real_mkstemp(*args, **kwargs)

    def fsync_until_the_disk_fills(fd):  # iteration 10's files fit; iteration 20's checkpoint finds no space
        if "iter_0000020" in writing[-1]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(storage.os, "fsync", fsync_until_the_disk_fills)
    trainer = Trainer(cfg)
    with pytest.raises(storage.DiskFullError, match="no space left on device") as err:
        trainer.fit()
    assert "\n" not in str(err.value) and str(Path(cfg["run_dir"])) in str(err.value)
    ckpt = Path(cfg["run_dir"]) / "checkpoints"
    assert not list(ckpt.glob(".*.tmp")) and load_latest(ckpt)[0]["iteration"] == 10  # no temp file; 10 intact
    assert "no space left on device" in (Path(cfg["run_dir"]) / "train.log").read_text()
    monkeypatch.setattr(storage.os, "fsync", real_fsync)  # space freed
    monkeypatch.setattr(storage.tempfile, "mkstemp", real_mkstemp)
    trainer.release_run_directory()
    resumed = Trainer(cfg)
    assert resumed.resume() and resumed.iteration == 10
    resumed.fit()
    for name, net in reference.method.networks.items():
        for a, b in zip(net.state_dict().values(), resumed.method.networks[name].state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_training_again_into_a_run_with_checkpoints_refuses_to_overwrite(tiny_cfg):
    cfg = tiny_cfg(iterations=10)
    train(cfg)
    config_file = Path(cfg["run_dir"]) / "config.yaml"
    before = config_file.read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        train({**cfg, "lr": 0.5})
    assert config_file.read_text() == before  # the earlier run's record is untouched


def test_unknown_config_key_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="unknown config key.*'lerning_rate'"):
        tiny_cfg(lerning_rate=0.1)


def test_non_finite_loss_stops_with_the_iteration_and_term(tiny_cfg, tmp_path: Path, monkeypatch):
    module = tmp_path / "nan_method.py"
    module.write_text(textwrap.dedent('''
        import torch
        from dust.methods.supervised import Supervised

        class NanAfterFive(Supervised):
            def train_step(self, batch, iteration):
                losses = super().train_step(batch, iteration)
                if iteration == 5:
                    losses["sup"] = losses["sup"] * float("nan")
                return losses
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = Trainer(tiny_cfg(method="nan_method:NanAfterFive"))
    with pytest.raises(NonFiniteLossError, match=r"iteration 5: loss term\(s\) \['sup'\]"):
        trainer.fit()
    sys.modules.pop("nan_method", None)


def test_a_users_own_method_plugs_in_without_editing_dust(tiny_cfg, tmp_path: Path, monkeypatch):
    module = tmp_path / "my_lab_method.py"
    module.write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from dust.methods import Method
        from dust.models import make_model

        class PlainCE(Method):
            defaults = {"ce_weight": 1.0}

            def build(self):
                self.networks["model"] = make_model(self.cfg)

            def train_step(self, batch, iteration):
                logits = self.networks["model"](batch["labeled_image"])
                return {"ce": self.cfg["ce_weight"] * F.cross_entropy(logits.float(), batch["label"])}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_cfg(method="my_lab_method:PlainCE", ce_weight=0.5)
    records = train(cfg)
    assert [r["checkpoint"] for r in records] == ["last", "best"]
    assert records[0]["method"] == "my_lab_method:PlainCE"
    sys.modules.pop("my_lab_method", None)


def test_a_users_method_reading_a_batch_key_of_older_dust_is_told_its_new_name(tiny_cfg, tmp_path: Path,
                                                                              monkeypatch):
    module = tmp_path / "old_lab_method.py"
    module.write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from dust.methods import Method
        from dust.models import make_model

        class OldKeys(Method):
            def build(self):
                self.networks["model"] = make_model(self.cfg)

            def train_step(self, batch, iteration):
                return {"ce": F.cross_entropy(self.networks["model"](batch["x_l"]).float(), batch["y_l"])}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyError, match="'x_l' \\(renamed 'labeled_image'\\)"):
        Trainer(tiny_cfg(method="old_lab_method:OldKeys")).fit()
    sys.modules.pop("old_lab_method", None)


def test_full_config_fills_defaults():
    cfg = full_config({"method": "supervised"})
    assert cfg["lr"] == 0.01 and cfg["momentum"] == 0.9 and cfg["weight_decay"] == 1e-4


def test_bf16_auto_follows_the_hardware_and_explicit_values_win(monkeypatch):
    # an AVX2-only CPU emulates bf16 (~20x slower than fp32), so "auto" must not switch it on there
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert full_config({"method": "supervised", "device": "cpu"})["bf16"] is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(dust.config, "cpu_has_native_bf16", lambda: True)
    assert full_config({"method": "supervised", "device": "cpu"})["bf16"] is True
    # oneDNN says "supported" on every AVX512 CPU; without AVX512-BF16 / AMX flags it is emulated, so auto is off
    monkeypatch.setattr(dust.config, "cpu_has_native_bf16", lambda: False)
    assert full_config({"method": "supervised", "device": "cpu"})["bf16"] is False
    assert full_config({"method": "supervised", "bf16": False})["bf16"] is False
    with pytest.raises(ConfigError, match="bf16: expected auto, true or false, got 'yes'"):
        full_config({"method": "supervised", "bf16": "yes"})


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert dust.config.cpu_has_native_bf16(cpuinfo) is False  # AVX512 without BF16: oneDNN emulates
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert dust.config.cpu_has_native_bf16(cpuinfo) is True
    assert dust.config.cpu_has_native_bf16(tmp_path / "absent") is True  # not Linux: oneDNN's check decides


def test_batchnorm_recalibration_leaves_networks_that_predict_does_not_use(tiny_cfg):
    trainer = Trainer(tiny_cfg(method="cps", iterations=4, val_every=4))  # predicts with "model" only
    trainer.fit()
    def stats(name: str) -> list[torch.Tensor]:
        return [b.clone() for k, b in trainer.method.networks[name].state_dict().items() if "running" in k]
    before_model, before_model2 = stats("model"), stats("model2")
    method = trainer.method
    recalibrate_batchnorm(method.networks, method.predict, [torch.rand(4, 1, 32, 32)], contextlib.nullcontext())
    assert all(torch.equal(a, b) for a, b in zip(before_model2, stats("model2"), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before_model, stats("model"), strict=True))


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_a_checkpoint_holding_code_is_refused_in_one_line_without_a_load_it_anyway_hint(tmp_path: Path):
    from dust.engine.checkpoint import load_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"networks": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "refused" in message and "system" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_checkpoint_whose_config_was_edited_to_another_model_is_one_line_naming_the_file(tiny_cfg, capsys):
    from dust.cli.main import main

    trainer = Trainer(tiny_cfg(iterations=2, val_every=2))
    trainer.fit()
    path = trainer.ckpt_dir / "best.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["channels"] = [8, 16, 32, 64, 128]  # a hand edit: the weights are of a 4-64 U-Net
    torch.save(state, path)
    assert main(["evaluate", "--checkpoint", str(path), "--split", "val"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and str(path) in message and "'model'" in message and "size mismatch" in message
