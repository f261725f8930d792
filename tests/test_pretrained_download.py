"""`pretrained=True` through timm's URL download path (a file:// URL stands in for the authors' release)."""
import argparse

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
