"""Training stack: config composition, train -> kill mid-save -> resume (exact), DDP vs single process, bad input.

Runs on the CPU with a tiny ffnet_t (embed 16..128, one block per stage) on the embedded digits data.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from backbones.training import (AtomicCheckpointIO, ImageClassifier, instantiate_all, register_model_configs,
                                read_checkpoint, train)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = [
    "model.kwargs.embed_dim=[16,32,64,128]", "model.kwargs.depth=[1,1,1,1]", "model.kwargs.in_dim=16",
    "data.batch_size=32", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu", "logger=csv",
]
# randomness everywhere (drop path, Mixup/CutMix, crops, EMA warm-up) so an inexact resume cannot hide
RANDOM = ["model.kwargs.drop_path_rate=0.1", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0"]

register_model_configs(str(CONF))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine has 2 cores; subprocesses get OMP_NUM_THREADS=1 too
    yield
    torch.set_num_threads(n)


def make_cfg(out: Path, overrides=(), config="train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=[f"output_dir={out}", *overrides])


def run_train_py(args, cwd=ROOT, check=True, timeout=240, umask=-1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               WANDB_MODE="offline")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout, umask=umask)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def weights(path: Path):
    return read_checkpoint(path)["state_dict"]


class KillMidSave(Callback):
    """Test helper: from epoch ``epoch`` on, the next checkpoint write stops halfway and the process is SIGKILLed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.epoch:
            return
        real_save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_half_then_die


# ---- configuration ---------------------------------------------------------------------------------------------
def test_every_config_group_composes(tmp_path):
    groups = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}
    assert set(groups) == {"model", "data", "optim", "trainer", "logger", "callbacks", "experiment"}
    for group, options in groups.items():
        for opt in options:
            cfg = make_cfg(tmp_path, [f"{group}={opt}"])
            OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            import timm
            assert timm.is_model(cfg.model.name), (group, opt, cfg.model.name)
            assert cfg.data._target_.endswith("ImageDataModule")
            if group == "callbacks":
                cbs = instantiate_all(cfg.callbacks)
                assert len(cbs) == len([v for v in cfg.callbacks.values() if "_target_" in v])
            if group == "logger":
                assert len(instantiate_all(cfg.logger)) == {"none": 0, "many": 2}.get(opt, 1)
            if group == "trainer" and cfg.trainer.accelerator != "gpu":
                import hydra
                trainer = hydra.utils.instantiate(cfg.trainer, accelerator="cpu", logger=False)
                assert trainer.max_epochs == cfg.trainer.max_epochs
    # the eval config composes with every model and data option too
    for opt in groups["data"]:
        make_cfg(tmp_path, [f"data={opt}"], config="eval")
    # defaults: ffnet_t (reduced) on digits, wandb offline, best + last checkpoints
    cfg = make_cfg(tmp_path)
    assert (cfg.model.name, cfg.data.name, cfg.logger.wandb.offline) == ("ffnet_t", "digits", True)
    assert {cfg.callbacks.model_checkpoint.filename, cfg.callbacks.last_checkpoint.filename} == {"best", "last"}
    # an added callback config keeps the defaults (the pattern `callbacks=ofq` follows)
    assert set(make_cfg(tmp_path, ["callbacks=early_stopping"]).callbacks) >= {"model_checkpoint", "early_stopping"}


def test_any_hub_model_is_a_model_option(tmp_path):
    import timm
    from timm.models import model_entrypoint
    hub = [m for m in timm.list_models() if model_entrypoint(m).__module__.startswith("backbones.")]
    assert "ffnet_t" in hub
    without_yaml = [m for m in hub if not (CONF / "model" / f"{m}.yaml").exists()]
    for name in without_yaml[:3] or ["ffnet_t"]:
        cfg = make_cfg(tmp_path, [f"model={name}"])
        assert (cfg.model.name, cfg.model.pretrained) == (name, False)


def test_typo_in_config_key_or_option_is_rejected(tmp_path):
    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        make_cfg(tmp_path, ["trainer.max_epoch=3"])
    with pytest.raises(ConfigCompositionException, match="digitz"):
        make_cfg(tmp_path, ["data=digitz"])


def test_cli_help_cfg_job_and_multirun(tmp_path):
    p = run_train_py(["--help"])
    for group in ("model", "data", "optim", "trainer", "logger", "callbacks", "experiment"):
        assert f"{group}:" in p.stdout
    assert "ffnet_t_nano" in p.stdout
    job = run_train_py(["--cfg", "job", "model=ffnet_s"]).stdout
    assert "name: ffnet_s" in job and "_target_: lightning.pytorch.Trainer" in job
    # a -m sweep: one run (and output folder) per value; stdout is a pipe and the progress bar setting is left at
    # its default (null): one log line per epoch, no bar
    tiny = [a for a in TINY if not a.startswith("trainer.enable_progress_bar")]
    p = run_train_py(["-m", "optim.optimizer.lr=1e-3,3e-3", *tiny, "trainer.max_epochs=1",
                      "trainer.limit_train_batches=1", "logger=none", f"hydra.sweep.dir={tmp_path}"], umask=0o027)
    assert "it/s]" not in p.stdout + p.stderr and "Epoch 0:" not in p.stdout + p.stderr
    for job_num, lr in ((0, 1e-3), (1, 3e-3)):
        run = tmp_path / str(job_num)
        ckpt = read_checkpoint(run / "checkpoints/last.ckpt")
        assert ckpt["hyper_parameters"]["optimizer"]["lr"] == lr
        # the run folder tells the story: train.log holds the log lines, the umask decides the modes
        log = (run / "train.log").read_text()
        assert "epoch 1/1, step 1, train/loss" in log and "Trainer.fit` stopped" in log
        for f in (run / "checkpoints/last.ckpt", run / "checkpoints/best.ckpt", run / "train.log"):
            assert f.stat().st_mode & 0o777 == 0o640, (f, oct(f.stat().st_mode))
        assert (run / "checkpoints").stat().st_mode & 0o777 == 0o750


# ---- bad input: clear errors, nothing written ------------------------------------------------------------------
def test_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'ffnet_tt'.*ffnet_t"):
        train(make_cfg(tmp_path / "run", TINY + ["model.name=ffnet_tt"]))
    assert not (tmp_path / "run").exists()


def test_missing_data_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root=.*nope.* does not exist"):
        train(make_cfg(tmp_path / "run", TINY + ["data=imagefolder", f"data.root={tmp_path / 'nope'}"]))
    assert not (tmp_path / "run").exists()


def test_atomic_checkpoint_io_keeps_previous_file(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io_.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---- the loop --------------------------------------------------------------------------------------------------
def test_train_kill_mid_save_resume_is_exact(tmp_path):
    overrides = TINY + RANDOM
    # 1) uninterrupted reference
    ref = train(make_cfg(tmp_path / "ref", overrides))
    ref_ckpt = read_checkpoint(tmp_path / "ref/checkpoints/last.ckpt")
    assert ref_ckpt["epoch"] == 2 and ref_ckpt["global_step"] == 12
    assert (tmp_path / "ref/checkpoints/best.ckpt").is_file() and "val/top1" in ref and "val_ema/top1" in ref

    # 2) the same run through train.py, SIGKILLed halfway through writing a checkpoint in epoch 1
    killed = tmp_path / "killed"
    p = run_train_py([*overrides, f"hydra.run.dir={killed}", "+callbacks.kill._target_=test_training.KillMidSave",
                      "+callbacks.kill.epoch=1"], check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    files = sorted(f.name for f in (killed / "checkpoints").iterdir())
    assert any(".tmp" in f for f in files), files  # it really died mid-write ...
    last = read_checkpoint(killed / "checkpoints/last.ckpt")  # ... and last.ckpt is the intact epoch-0 one
    assert last["epoch"] == 0 and last["global_step"] == 4

    # 3) resume: optimizer, scheduler, EMA, epoch and RNG continue exactly
    resumed = train(make_cfg(tmp_path / "resumed", overrides + [f"ckpt_path={killed / 'checkpoints/last.ckpt'}"]))
    end = read_checkpoint(tmp_path / "resumed/checkpoints/last.ckpt")
    assert end["epoch"] == 2 and end["global_step"] == 12
    for k, v in ref_ckpt["state_dict"].items():
        assert torch.equal(v, end["state_dict"][k]), k
    assert resumed["val/top1"] == ref["val/top1"] and resumed["val_ema/top1"] == ref["val_ema/top1"]
    # timm-style parameter groups: no weight decay on norms/biases; per-step cosine schedule with warm-up
    groups = end["optimizer_states"][0]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    sched = end["lr_schedulers"][0]
    assert (sched["t_initial"], sched["warmup_t"]) == (12, 4)


def test_resume_refuses_corrupt_or_mismatched_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not a checkpoint"):
        train(make_cfg(tmp_path / "run", TINY + [f"ckpt_path={bad}"]))
    assert not (tmp_path / "run").exists()

    train(make_cfg(tmp_path / "ten", TINY + ["trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                             "module.ema_decay=null"]))
    folder = tmp_path / "three"
    for c in range(3):
        for split in ("train", "validation"):
            (folder / split / f"class{c}").mkdir(parents=True)
            from PIL import Image
            Image.new("RGB", (40, 40), (80 * c, 0, 0)).save(folder / split / f"class{c}" / "0.png")
    with pytest.raises(ValueError, match="10 classes but the dataset has 3"):
        train(make_cfg(tmp_path / "run", TINY + ["data=imagefolder", f"data.root={folder}",
                                                 f"ckpt_path={tmp_path / 'ten/checkpoints/last.ckpt'}"]))
    assert not (tmp_path / "run").exists()


def test_imagenet_style_recipe_on_an_image_folder(tmp_path):
    """data=imagefolder: RandAugment, random erasing, Mixup/CutMix soft targets, worker processes."""
    from PIL import Image
    for split in ("train", "validation"):
        for c in range(3):
            (tmp_path / "images" / split / f"c{c}").mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (48, 40), (60 * c + 5 * i, 90, 30 * i)).save(tmp_path / "images" / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "run"
    metrics = train(make_cfg(out, TINY + [
        "data=imagefolder", f"data.root={tmp_path / 'images'}", "data.input_size=32", "data.batch_size=8",
        "data.num_workers=1", "data.pin_memory=false", "trainer.max_epochs=1", "trainer.limit_train_batches=3"]))
    assert metrics["train/loss_epoch"] > 0 and read_checkpoint(out / "checkpoints/last.ckpt")["global_step"] == 3


def test_ddp_two_processes_match_one_process(tmp_path):
    """2-process CPU DDP (gloo), per-process batch 8, vs 1 process with batch 16: the same global batches, so the
    same weights. BatchNorm uses frozen statistics here (torch's SyncBatchNorm is GPU-only) and augmentation is
    deterministic, so only the gradient all-reduce differs."""
    common = TINY + ["module.freeze_bn=true", "data.scale=[1.0,1.0]", "data.ratio=[1.0,1.0]",
                     "trainer.max_epochs=2", "trainer.limit_train_batches=3", "logger=none"]
    ddp = tmp_path / "ddp"
    run_train_py([*common, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=8",
                  f"hydra.run.dir={ddp}"])
    train(make_cfg(tmp_path / "single", common + ["data.batch_size=16"]))
    a, b = weights(ddp / "checkpoints/last.ckpt"), weights(tmp_path / "single/checkpoints/last.ckpt")
    assert read_checkpoint(ddp / "checkpoints/last.ckpt")["global_step"] == 6
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)  # vs ~5e-3 with batch 8 alone
    init = ImageClassifier("ffnet_t", 10, model_kwargs=dict(embed_dim=(16, 32, 64, 128), depth=(1, 1, 1, 1),
                                                                in_dim=16))
    moved = sum(not torch.allclose(a[f"model.{k}"], v) for k, v in init.model.state_dict().items()
                if f"model.{k}" in a and v.is_floating_point())
    assert moved > 10  # it trained


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_aux_logits_need_aux_loss_weight():
    m = ImageClassifier("ffnet_t", 10, model_kwargs=dict(embed_dim=(16, 32, 64, 128), depth=(1, 1, 1, 1), in_dim=16),
                        label_smoothing=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    plain = m.training_step((x, y), 0)
    forward = m.model.forward
    m.model.forward = lambda inp: (forward(inp), forward(inp))
    with pytest.raises(TypeError, match="aux_loss_weight"):
        m.training_step((x, y), 0)
    m.model.aux_loss_weight = 0.4
    torch.testing.assert_close(m.training_step((x, y), 0), 1.4 * plain)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_overlock_deep_supervision_is_switched_on_with_official_weight():
    tiny = dict(depth=(1, 1, 1, 1), sub_depth=(1, 1), embed_dim=(8, 8, 16, 16), kernel_size=(5, 5, 7, 5),
                sub_num_heads=(1, 2), sub_mlp_ratio=(3, 3), projection=16)
    m = ImageClassifier("overlock_xt", 10, model_kwargs=tiny, label_smoothing=0.0)
    assert m.model.aux_training and m.model.aux_loss_weight == 0.4
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    torch.manual_seed(0)
    loss = m.training_step((x, y), 0)
    torch.manual_seed(0)
    logits, aux = m.model.train()(x)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss, ce(logits, y) + 0.4 * ce(aux, y))
    m.model.eval()
    assert torch.is_tensor(m(x))  # validation sees the logits only


def test_compile_takes_a_mode():
    """module.compile: true/false or one of torch.compile's modes; a typo is one clear error."""
    kw = dict(model_kwargs=dict(embed_dim=(16, 32, 64, 128), depth=(1, 1, 1, 1), in_dim=16))
    m = ImageClassifier("ffnet_t", 10, compile="reduce-overhead", **kw)
    assert m._cuda_graphs and m._compiled is not None
    with pytest.raises(ValueError, match="reduce-overhead"):
        ImageClassifier("ffnet_t", 10, compile="reduce_overhead", **kw)
