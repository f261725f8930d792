"""ImageNet recipes (conf/experiment/imagenet_<family>.yaml), the model names `train.py --help` shows, and the
cosine schedule's cooldown that the recipes rely on. Nothing here trains."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.models import model_entrypoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import backbones  # noqa: F401  (registers the hub models)
from backbones.training import ImageClassifier, ImageDataModule, register_model_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_model_configs(str(CONF))

HUB_MODELS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("backbones."))
FAMILIES = sorted({model_entrypoint(n).__module__.split(".")[1] for n in HUB_MODELS})


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_one_recipe_per_family():
    recipes = sorted(p.stem[len("imagenet_"):] for p in (CONF / "experiment").glob("imagenet_*.yaml"))
    assert recipes == FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_composes_into_valid_arguments(family, tmp_path):
    cfg = _compose([f"experiment=imagenet_{family}", f"data.root={tmp_path}", f"output_dir={tmp_path}"])
    assert cfg.task_name == f"imagenet_{family}"
    assert model_entrypoint(cfg.model.name).__module__ == f"backbones.{family}"
    assert cfg.data.name == "imagefolder" and cfg.data.root == str(tmp_path)

    # every key is an argument of what train.py builds from it (a misspelt key would reach a constructor)
    data_args = set(inspect.signature(ImageDataModule).parameters)
    assert set(cfg.data) - {"_target_"} <= data_args
    assert set(cfg.module) <= set(inspect.signature(ImageClassifier).parameters)
    assert set(cfg.trainer) - {"_target_"} <= set(inspect.signature(L.Trainer).parameters)

    # the optimizer and the schedule are what timm makes of them
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    opt = create_optimizer_v2(torch.nn.Linear(2, 2), **optim["optimizer"])
    assert opt.defaults["lr"] == pytest.approx(optim["optimizer"]["lr"])
    cooldown = optim["scheduler"].get("cooldown_epochs") or 0
    create_scheduler_v2(opt, num_epochs=cfg.trainer.max_epochs - cooldown, updates_per_epoch=10,
                        step_on_epochs=False, **optim["scheduler"])

    # the model takes the recipe's kwargs (built on the meta device: no memory, no init cost)
    with torch.device("meta"):
        timm.create_model(cfg.model.name, num_classes=1000, **OmegaConf.to_container(cfg.model.kwargs))

    # a recipe is a multi-GPU run whose lr was set for its global batch
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices >= 1
    assert cfg.trainer.max_epochs >= 100 and cfg.optim.optimizer.lr > 0


def test_recipe_model_can_be_swapped_on_the_command_line(tmp_path):
    cfg = _compose(["experiment=imagenet_van", "model=van_b3", "model.kwargs.drop_path_rate=0.2",
                    f"data.root={tmp_path}"])
    assert cfg.model.name == "van_b3" and cfg.model.kwargs.drop_path_rate == 0.2
    assert cfg.optim.optimizer.lr == 1e-3  # the rest of the recipe stays


def test_help_lists_every_model_and_how_to_pick_one():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    section = p.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = dict(line.split(": ", 1) for line in section.splitlines() if ": " in line)
    listed = {name.strip() for name in groups["model"].split(",")}
    assert set(HUB_MODELS) <= listed, sorted(set(HUB_MODELS) - listed)
    recipes = {name.strip() for name in groups["experiment"].split(",")}
    assert {f"imagenet_{f}" for f in FAMILIES} <= recipes
    assert "model=NAME" in p.stdout and "experiment=imagenet_<family>" in p.stdout


def _scheduler(max_epochs: int, **sched):
    module = ImageClassifier("ffnet_t", num_classes=3, model_kwargs=dict(embed_dim=[8, 16, 32, 64], depth=[1, 1, 1, 1],
                                                                          in_dim=8),
                             optimizer=dict(opt="adamw", lr=1.0), scheduler=dict(sched="cosine", **sched))
    module._trainer = SimpleNamespace(max_epochs=max_epochs, estimated_stepping_batches=10 * max_epochs)
    return module.configure_optimizers()["lr_scheduler"]["scheduler"]


def _lr(scheduler, update: int) -> float:
    scheduler.step_update(num_updates=update)
    return scheduler.optimizer.param_groups[0]["lr"]


def test_cooldown_epochs_hold_min_lr_at_the_end_of_max_epochs():
    # 10 epochs of 10 updates, the last 2 epochs at min_lr: the cosine spans updates 0..80
    s = _scheduler(10, warmup_epochs=0, min_lr=0.0, cooldown_epochs=2)
    assert _lr(s, 40) == pytest.approx(0.5)      # half-way down an 80-update cosine
    assert _lr(s, 79) > 0.0
    assert _lr(s, 80) == 0.0 and _lr(s, 99) == 0.0
    # without a cooldown the cosine spans the whole run
    assert _lr(_scheduler(10, warmup_epochs=0, min_lr=0.0), 50) == pytest.approx(0.5)


def test_cooldown_as_long_as_the_run_is_an_error():
    with pytest.raises(ValueError, match="cooldown_epochs"):
        _scheduler(5, cooldown_epochs=5)
