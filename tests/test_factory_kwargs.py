"""timm's factory keywords and head API on every family: ``device=``/``dtype=`` build the model there (not on the CPU
and moved), forward on the meta device runs, and ``reset_classifier`` keeps the model's device, dtype and mode."""
import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import backbones  # noqa: F401  (registers the hub's models)
from backbones.halonet import StageCfg

# one small configuration per family: (model name, kwargs, input size)
FAMILIES = {
    "ffnet": ("ffnet_t", dict(embed_dim=(8, 16, 16, 16), depth=(1, 1, 1, 1), in_dim=8), 32),
    "davit": ("davit_t", dict(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1)), 32),
    "halonet": ("halo_resnet26t", dict(stem_chs=16, halo=dict(block_size=2, halo_size=1, num_heads=2), stages=(
        StageCfg("c", 16, 1), StageCfg("h", 16), StageCfg("ch", 32, group_size=8), StageCfg("h", 32))), 64),
    "msmlp": ("msmlp_t", dict(embed_dim=10, depths=(1, 1, 1, 1)), 32),
    "overlock": ("overlock_xt", dict(depth=(1, 1, 1, 1), sub_depth=(1, 1), embed_dim=(8, 8, 16, 16),
                                     kernel_size=(5, 5, 7, 5), sub_num_heads=(1, 2), projection=16), 64),
    "spikformer": ("spikformer_8_384", dict(embed_dim=16, depth=1, num_heads=2, T=2), 32),
    "transnext": ("transnext_micro", dict(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1)),
                  64),
    "van": ("van_b0", dict(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1)), 32),
}


def _build(family, **kwargs):
    name, kw, size = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, **kw, **kwargs), size


class _CpuAllocations(TorchDispatchMode):
    """Records the CPU tensors of more than a few elements that any op creates (parameters built on the CPU)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen += [str(func) for t in tree_leaves(out)
                      if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 64]
        return out


def test_every_family_is_covered():
    modules = {fn.__module__.split(".")[-1] for fn in timm.models._registry._model_entrypoints.values()
               if fn.__module__.startswith("backbones.")}
    assert modules == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_bf16_build_and_forward(family):
    with _CpuAllocations() as allocs:
        model, size = _build(family, device="meta", dtype=torch.bfloat16)
    assert not allocs.seen, f"built on the CPU first: {allocs.seen[:5]}"
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert tensors and all(t.device.type == "meta" for _, t in tensors)
    assert all(t.dtype == torch.bfloat16 for _, t in tensors if t.is_floating_point())
    out = model.eval()(torch.randn(2, 3, size, size, device="meta", dtype=torch.bfloat16))  # no autocast check fails
    assert out.shape == (2, 7) and out.device.type == "meta" and out.dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_build_matches_float32_build(family):
    model64, size = _build(family, dtype=torch.float64)
    model32, _ = _build(family)
    assert all(p.dtype == torch.float64 for p in model64.parameters())
    # the same architecture, and buffers (BatchNorm statistics) initialised to the same values
    sd64, sd32 = model64.state_dict(), model32.state_dict()
    assert sd64.keys() == sd32.keys()
    for k, v in sd32.items():
        assert sd64[k].shape == v.shape, k
    for k, v in model32.named_buffers():
        torch.testing.assert_close(sd64[k], v.to(sd64[k].dtype), msg=k)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        assert torch.isfinite(model64.eval()(x)).all()


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_reset_classifier_keeps_device_dtype_and_mode(family, train):
    model, size = _build(family, dtype=torch.float64)
    model.train(train)
    model.reset_classifier(0)
    model.reset_classifier(3)
    head = model.get_classifier()
    assert all(p.dtype == torch.float64 for p in head.parameters()) and list(head.parameters())
    assert all(m.training == train for m in model.modules())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    out = model(x)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    meta = model.to(device="meta")  # and on another device
    meta.reset_classifier(4)
    assert all(p.device.type == "meta" for p in meta.get_classifier().parameters())
