"""`pretrained=True` through timm's URL download path (a file:// URL stands in for the authors' release)."""
import argparse
import sys
import types

import pytest
import timm
import torch

import backbones  # noqa: F401
from parity_utils import assert_rel_close, load_fixture


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # timm's download cache
    return tmp_path


def test_download_of_a_timm_style_training_checkpoint(torch_home):
    """The released FFNet files are timm train.py checkpoints: weights under 'state_dict' next to the run's
    argparse.Namespace, which torch.load(weights_only=True) (timm's download path) refuses unless allowed."""
    weights, io, meta = load_fixture("ffnet", "ffnet_tiny_cfg")
    kwargs = {k: v for k, v in meta["kwargs"].items() if k != "drop_path_rate"}
    ckpt = {"epoch": 299, "arch": "ffnet_1", "state_dict": weights, "version": 2, "metric": 81.3,
            "args": argparse.Namespace(model="ffnet_1", lr=1e-3, drop_path=0.1)}
    path = torch_home / "ffnet_1.pth.tar"
    torch.save(ckpt, path)
    model = timm.create_model("ffnet_t", pretrained=True, **kwargs,
                              pretrained_cfg_overlay=dict(url=path.as_uri(), num_classes=10))
    assert (torch_home / "torch_home" / "hub" / "checkpoints" / "ffnet_1.pth.tar").exists()  # went through the cache
    with torch.no_grad():
        assert_rel_close(model.double().eval()(io["input"].double()), io["logits"], 1e-6, "logits")


def test_download_of_a_swin_style_checkpoint_with_a_yacs_config(torch_home, monkeypatch):
    """MS-MLP's released files pickle the run's yacs CfgNode next to the weights; yacs is not installed here."""
    weights, io, meta = load_fixture("msmlp", "msmlp_tinycfg_128x160")
    cfg_module = types.ModuleType("yacs.config")

    class CfgNode(dict):  # what yacs' CfgNode pickles as: a dict subclass with an attribute
        def __init__(self, init_dict=None):
            super().__init__(init_dict or {})
            self.__dict__["_immutable"] = False
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    cfg_module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", cfg_module)
    config = CfgNode({"MODEL": CfgNode({"TYPE": "msmlp", "DROP_PATH_RATE": 0.2}), "SEED": 0})
    path = torch_home / "msmlp_tiny_ckpt_epoch299.pth"
    torch.save({"model": weights, "optimizer": {}, "max_accuracy": 82.1, "epoch": 299, "config": config}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # the loading side has no yacs
    monkeypatch.delitem(sys.modules, "yacs")
    from test_msmlp import _fixture, _float64
    _, _, kwargs = _fixture()
    with _float64():  # float64 weights load without rounding
        model = timm.create_model("msmlp_t", pretrained=True, **kwargs,
                                  pretrained_cfg_overlay=dict(url=path.as_uri(), num_classes=kwargs["num_classes"]))
    with torch.no_grad():
        assert_rel_close(model.eval()(io["input"].double()), io["logits"], 1e-6, "logits")
