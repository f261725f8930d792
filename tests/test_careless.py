"""Careless runs never lose work (issue 28): each test reproduces what a user did and checks the run fails loudly, or
works, instead of silently losing or corrupting work. CPU, tiny ffnet_t, tiny data."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from PIL import Image

from backbones.training import (DivergenceError, load_weights, read_checkpoint, register_model_configs, train,
                                unique_dir)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY_KW = dict(embed_dim=(16, 32, 64, 128), depth=(1, 1, 1, 1), in_dim=16)
TINY = [
    "model.kwargs.embed_dim=[16,32,64,128]", "model.kwargs.depth=[1,1,1,1]", "model.kwargs.in_dim=16",
    "data.batch_size=32", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.max_epochs=1",
    "trainer.enable_model_summary=false", "trainer.accelerator=cpu", "logger=none",
]

register_model_configs(str(CONF))


def make_cfg(out: Path, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={out}", *overrides])


def run_train_py(args, cwd, env=None):
    extra, env = env or {}, dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240, umask=0o027)


def image_folder(root: Path, n_per_class: int, classes: int = 2, size=(20, 20)) -> Path:
    for split in ("train", "validation"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                Image.new("RGB", size, (100 * c, 7 * i, 50)).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A train.py checkpoint of a tiny ffnet_t (digits, 2 steps, EMA)."""
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    train(make_cfg(out, TINY + ["module.ema_decay=0.9"]))
    return out / "checkpoints" / "last.ckpt"


# ---- run folders -----------------------------------------------------------------------------------------------
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the default hydra.run.dir of two runs whose clocks read the same second
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfgs = [compose("train", return_hydra_config=True) for _ in range(2)]
    OmegaConf.register_new_resolver("now", lambda pattern: "2030-01-01_00-00-00", replace=True, use_cache=True)
    try:
        dirs = [OmegaConf.select(c, "hydra.run.dir") for c in cfgs]
    finally:
        from hydra.core.utils import setup_globals
        setup_globals()  # Hydra's own `now` resolver back
    assert dirs[0] != dirs[1] and all((tmp_path / d).is_dir() for d in dirs), dirs
    assert dirs[0].startswith("outputs/train/2030-01-01_00-00-00")
    # the folder-naming code itself, twice within a second: two fresh folders
    a, b = unique_dir(str(tmp_path / "same")), unique_dir(str(tmp_path / "same"))
    assert a != b and Path(a).is_dir() and Path(b).is_dir()


def test_failed_cli_run_prints_one_line_and_leaves_no_folder(tmp_path):
    p = run_train_py(["model.name=ffnet_tt"], cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "Error: unknown model 'ffnet_tt': not a hub or timm model; did you mean ffnet_t, ffnet_s, ffnet_l?"]
    assert "Traceback" not in p.stdout + p.stderr
    assert not any((tmp_path / "outputs" / "train").iterdir())  # the failed run's folder is gone
    # HYDRA_FULL_ERROR=1: the traceback, as Hydra users expect
    p = run_train_py(["model.name=ffnet_tt"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert p.returncode == 1 and "Traceback" in p.stderr and "unknown model 'ffnet_tt'" in p.stderr


def test_wrong_channel_count_fails_before_the_first_step_and_removes_its_folder(tmp_path):
    run = unique_dir(str(tmp_path / "run"))  # what hydra.run.dir does for every run
    with pytest.raises(ValueError, match="in_chans=1 but the input has 3 channels"):
        train(make_cfg(Path(run), TINY + ["+model.kwargs.in_chans=1", "logger=csv"]))
    assert not Path(run).exists()
    # a folder the user named (hydra.run.dir=...) may hold earlier work: it stays
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError):
        train(make_cfg(mine, TINY + ["+model.kwargs.in_chans=1"]))
    assert (mine / "notes.txt").read_text() == "keep"


# ---- divergence ------------------------------------------------------------------------------------------------
class PoisonWeights(Callback):
    """Test helper: from epoch ``epoch`` on, every weight becomes NaN before the batch (a diverging update)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch >= self.epoch:
            with torch.no_grad():
                for p in pl_module.model.parameters():
                    p.fill_(float("nan"))


def test_diverging_learning_rate_stops_with_the_step_and_remedy(tmp_path):
    with pytest.raises(DivergenceError, match=r"training diverged: .* at step \d+ .*lower the learning rate.*"
                                              r"clip gradients \(trainer.gradient_clip_val=1.0\)"):
        train(make_cfg(tmp_path / "run", TINY + ["optim=sgd", "optim.optimizer.lr=1e4",
                                                 "optim.scheduler.warmup_epochs=0", "trainer.gradient_clip_val=null",
                                                 "trainer.limit_train_batches=8"]))


def test_divergence_never_overwrites_a_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match="at step 3 "):
        train(make_cfg(out, TINY + ["trainer.max_epochs=3", "+callbacks.poison._target_=test_careless.PoisonWeights",
                                    "+callbacks.poison.epoch=1"]))
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = read_checkpoint(out / "checkpoints" / name)
        assert ckpt["epoch"] == 0 and ckpt["global_step"] == 2
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---- tiny data -------------------------------------------------------------------------------------------------
def test_fewer_images_than_one_batch_still_train(tmp_path):
    folder = image_folder(tmp_path / "images", n_per_class=8)  # 16 training images, batch size 128
    base = TINY + ["data=imagefolder", f"data.root={folder}", "data.input_size=32", "data.num_workers=0",
                   "data.pin_memory=false", "trainer.limit_train_batches=null", "trainer.max_epochs=2"]
    train(make_cfg(tmp_path / "run", base + ["data.batch_size=128"]))
    assert read_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 2  # one batch per epoch
    # Mixup needs even batches: 15 images train on batches of 14
    (folder / "train" / "c0" / "0.png").unlink()
    train(make_cfg(tmp_path / "mix", base + ["data.batch_size=128", "data.mixup_alpha=0.8"]))
    assert read_checkpoint(tmp_path / "mix/checkpoints/last.ckpt")["global_step"] == 2
    # one image is too few: an error with the numbers
    one = image_folder(tmp_path / "one", n_per_class=1)
    (one / "train" / "c1" / "0.png").unlink()
    with pytest.raises(ValueError, match="training split has 1 images .1 per process.*data.batch_size=128"):
        train(make_cfg(tmp_path / "r1", base + [f"data.root={one}", "data.batch_size=128"]))
    # no training batch at all never ends as a success
    with pytest.raises(ValueError, match="trained on nothing: 1437 training images.*limit_train_batches=0"):
        train(make_cfg(tmp_path / "r0", TINY + ["trainer.limit_train_batches=0"]))


# ---- resume and starting weights ---------------------------------------------------------------------------------
def test_resume_with_another_model_or_architecture_is_one_clear_error(tmp_path, tiny_ckpt):
    with pytest.raises(ValueError, match=r"is a checkpoint of ffnet_t .* but the config builds van_b0 .*weights="):
        train(make_cfg(tmp_path / "run", ["model=van_b0", *TINY[3:], f"ckpt_path={tiny_ckpt}"]))
    with pytest.raises(ValueError, match=r"depth.*\[1, 1, 1, 1\].*depth.*\[1, 1, 2, 1\]"):
        train(make_cfg(tmp_path / "run", TINY + ["model.kwargs.depth=[1,1,2,1]", f"ckpt_path={tiny_ckpt}"]))
    assert not (tmp_path / "run").exists()


def test_weight_files_missing_corrupt_or_foreign_name_the_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("ffnet_t", **TINY_KW).state_dict(), good)
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x04 this is not a pickle" * 50)
    (tmp_path / "text.pth").write_text("hello\n" * 20)
    (tmp_path / "half.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save(timm.create_model("van_b0", num_classes=10).state_dict(), tmp_path / "van.pth")
    cases = {"missing.pth": "does not exist", "garbage.pth": "corrupt or not a PyTorch", "text.pth": "corrupt",
             "half.pth": "corrupt", "van.pth": "not a checkpoint of ffnet_t: .*missing key"}
    for name, what in cases.items():
        with pytest.raises(ValueError, match=f"weights file '{tmp_path / name}' .*{what}"):
            timm.create_model("ffnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / name)),
                              **TINY_KW)
    # eval.py ckpt= with another model's checkpoint
    from backbones.training import load_eval_model
    with pytest.raises(ValueError, match=f"weights file '{tmp_path / 'van.pth'}' is not a checkpoint of ffnet_t"):
        load_eval_model("ffnet_t", TINY_KW, 10, ckpt=str(tmp_path / "van.pth"))
    m = timm.create_model("ffnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(good)), **TINY_KW)
    assert torch.equal(m.stem[0].c.weight, torch.load(good)["stem.0.c.weight"])


def test_weights_setting_loads_ckpt_export_or_official_file(tmp_path, tiny_ckpt):
    from backbones.training import export_hub
    ema = {k[len("ema.module."):]: v for k, v in read_checkpoint(tiny_ckpt)["state_dict"].items()
           if k.startswith("ema.module.")}
    fresh = lambda n=10: timm.create_model("ffnet_t", num_classes=n, **TINY_KW)  # noqa: E731
    m = fresh()
    assert load_weights(m, str(tiny_ckpt)).startswith("EMA weights")
    assert all(torch.equal(v, ema[k]) for k, v in m.state_dict().items())
    export_hub(m, tmp_path / "export")
    torch.save({"model": m.state_dict()}, tmp_path / "official.pth")
    for src in (tmp_path / "export", tmp_path / "official.pth"):
        m2 = fresh()
        load_weights(m2, str(src))
        assert all(torch.equal(v, ema[k]) for k, v in m2.state_dict().items()), src
    # another class count: everything but the classifier
    m3 = fresh(3)
    load_weights(m3, str(tiny_ckpt))
    assert torch.equal(m3.stem[0].c.weight, ema["stem.0.c.weight"]) and m3.head.fc.weight.shape[0] == 3
    with pytest.raises(ValueError, match="holds ffnet_t weights but the model is van_b0"):
        load_weights(timm.create_model("van_b0", num_classes=10), str(tiny_ckpt))


class RecordStart(Callback):
    """Test helper: the model's state_dict when training starts (after OFQ has quantized it)."""
    state = None

    def on_train_start(self, trainer, pl_module):
        RecordStart.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_ofq_starts_from_a_full_precision_checkpoint_and_warns_on_random_init(tmp_path, tiny_ckpt, caplog):
    ofq = TINY + ["callbacks=ofq", "trainer.limit_train_batches=1",
                  "+callbacks.record._target_=test_careless.RecordStart"]
    with caplog.at_level(logging.WARNING, logger="backbones.quant.callback"):
        train(make_cfg(tmp_path / "rand", ofq))
    assert "OFQ starts from randomly initialised weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backbones.quant.callback"):
        train(make_cfg(tmp_path / "fp", ofq + [f"weights={tiny_ckpt}"]))
    assert "randomly initialised" not in caplog.text
    ema = read_checkpoint(tiny_ckpt)["state_dict"]
    common = [k for k in RecordStart.state if f"ema.module.{k}" in ema]
    assert len(common) > 20  # the quantized model starts from the checkpoint's (EMA) weights
    assert all(torch.equal(RecordStart.state[k], ema[f"ema.module.{k}"]) for k in common)


# ---- unreadable images -------------------------------------------------------------------------------------------
def test_truncated_image_is_named_counted_and_fails_past_the_threshold(tmp_path, caplog):
    folder = image_folder(tmp_path / "images", n_per_class=8, size=(40, 40))
    bad = folder / "train" / "c1" / "3.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(bad)
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    base = TINY + ["data=imagefolder", f"data.root={folder}", "data.input_size=32", "data.num_workers=1",
                   "data.pin_memory=false", "data.batch_size=17", "data.mixup_alpha=0", "data.cutmix_alpha=0",
                   "trainer.limit_train_batches=null"]
    with pytest.raises(ValueError, match=f"1 of the 17 train images are unreadable .*{bad}.*data.max_unreadable"):
        train(make_cfg(tmp_path / "strict", base))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(make_cfg(tmp_path / "lenient", base + ["data.max_unreadable=0.1"]))
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0]
    assert any("unreadable images 1" in r.getMessage() for r in caplog.records if r.name.endswith("callbacks"))
