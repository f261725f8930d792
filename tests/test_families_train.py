"""Every family trains through the Lightning module (and `model=<name>` resolves for every hub model in Hydra)."""
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from backbones.halonet import StageCfg
from backbones.training import ImageClassifier, register_model_configs, train

CONF = Path(__file__).resolve().parents[1] / "conf"
# (hub model, tiny architecture kwargs, input size): the smallest configurations each family's code takes
FAMILIES = [
    ("ffnet_t", dict(embed_dim=(8, 16, 32, 64), in_dim=8, depth=(1, 1, 1, 1)), 32),
    ("van_b0", dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2)), 32),
    ("davit_t", dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 2, 4), window_size=3), 32),
    ("transnext_micro", dict(embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 4, 4), depths=(1, 1, 1, 1), img_size=64),
     64),
    ("msmlp_t", dict(embed_dim=10, depths=(1, 1, 1, 1)), 32),
    ("overlock_xt", dict(depth=(1, 1, 1, 1), sub_depth=(2, 2), embed_dim=(8, 8, 16, 16), kernel_size=(5, 5, 7, 5),
                         sub_num_heads=(1, 2), sub_mlp_ratio=(3, 3), projection=16), 32),
    ("spikformer_8_384", dict(embed_dim=16, num_heads=2, depth=1), 32),
    ("halo_h1", dict(stages=(StageCfg("h", 16, 1, 1.0), StageCfg("h", 24, 1, 1.0), StageCfg("h", 32, 1, 1.0),
                             StageCfg("h", 48, 1, 1.0)),
                     halo=dict(block_size=4, halo_size=1, num_heads=2), stem_type="7x7", stem_chs=16,
                     stem_pool=True, num_features=0, act_layer="relu"), 64),
]


# (learning rate, epochs of two steps) per family: the spiking and OverLoCK models need more to leave chance
TRAINING = {"ffnet_t": (1e-2, 8), "spikformer_8_384": (1e-2, 30), "overlock_xt": (2e-2, 12)}


def _colour_classes(n: int, size: int, seed: int):
    """Four classes a model separates from the mean colour alone: +R, +G, +B, -RGB, under unit-scale noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]]) * 3
    return torch.randn(n, 3, size, size, generator=g) + colours[y, :, None, None], y


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_learns(name, kwargs, size, tmp_path):
    """The smallest variant of every family (tiny widths) learns an easy task through the Lightning module: its
    accuracy on held-out images reaches a floor of twice chance."""
    torch.manual_seed(0)
    x, y = _colour_classes(16, size, 0)
    lr, epochs = TRAINING.get(name, (3e-3, 6))
    module = ImageClassifier(name, num_classes=4, model_kwargs=kwargs, optimizer=dict(opt="adamw", lr=lr),
                             scheduler=dict(sched="cosine", warmup_epochs=0))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    assert trainer.global_step == 2 * epochs
    xv, yv = _colour_classes(32, size, 1)
    with torch.no_grad():  # batch statistics: a few steps leave BatchNorm's running estimates far behind
        out = module.model.train()(xv)
    out = out[0] if isinstance(out, tuple) else out  # OverLoCK with deep supervision on: (logits, aux_logits)
    acc = (out.argmax(1) == yv).float().mean().item()
    assert acc >= 0.5, f"{name}: held-out accuracy {acc:.2f} after {2 * epochs} steps (chance 0.25)"


def test_model_group_resolves_every_hub_model(tmp_path):
    """`python train.py model=<hub name>` composes for a model with no yaml of its own, and its kwargs override."""
    register_model_configs(str(CONF))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"output_dir={tmp_path}", "model=van_b0", "+model.kwargs.embed_dims=[8,16,24,32]",
            "+model.kwargs.depths=[1,1,1,1]", "data.batch_size=32", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"])
    assert cfg.model.name == "van_b0"
    metrics = train(cfg)
    assert 0.0 <= metrics["val/top1"] <= 1.0 and (tmp_path / "checkpoints" / "last.ckpt").exists()
