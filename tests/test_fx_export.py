"""Per family: timm's FX feature extraction, torch.export and ONNX (dynamo exporter, run by onnxruntime).

Each family's smallest variant with tiny widths/depths at a small input (the code paths are the variant's; timm's own
FX tests in tests/test_timm_suite.py trace the full-size variants), eval mode, reference ops.
"""
import onnxruntime as ort
import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the hub's models)
from backbones.halonet import StageCfg

# (hub model, tiny architecture kwargs, input size)
FAMILIES = [
    ("ffnet_t", dict(embed_dim=(8, 16, 32, 64), in_dim=8, depth=(1, 1, 1, 1)), 32),
    ("van_b0", dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2)), 32),
    ("davit_t", dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 2, 4), window_size=3), 32),
    ("transnext_micro", dict(embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 4, 4), depths=(1, 1, 1, 1), img_size=64),
     64),
    ("msmlp_t", dict(embed_dim=10, depths=(1, 1, 1, 1)), 32),
    ("overlock_xt", dict(depth=(1, 1, 1, 1), sub_depth=(1, 1), embed_dim=(8, 8, 16, 16), kernel_size=(5, 5, 5, 5),
                         smk_size=3, sub_num_heads=(1, 2), sub_mlp_ratio=(3, 3), projection=16), 32),
    ("spikformer_8_384", dict(embed_dim=16, num_heads=2, depth=2, T=2), 32),
    ("halo_h0", dict(stages=(StageCfg("h", 16, 1, 1.0), StageCfg("h", 24, 1, 1.0), StageCfg("h", 32, 1, 1.0),
                             StageCfg("h", 48, 1, 1.0)),
                     halo=dict(block_size=4, halo_size=1, num_heads=2), stem_type="7x7", stem_chs=16,
                     stem_pool=True, num_features=0, act_layer="relu"), 64),
]
IDS = [f[0] for f in FAMILIES]


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("METAMIXER_OPS_IMPL", "reference")


def _create(name, kwargs, **extra):
    torch.manual_seed(0)  # the same weights for every call with the same arguments
    return timm.create_model(name, **kwargs, **extra).eval()


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=IDS)
def test_fx_features_match_default_features(name, kwargs, size):
    default = _create(name, kwargs, features_only=True)
    fx = _create(name, kwargs, features_only=True, feature_cls="fx")
    assert type(fx).__name__ == "FeatureGraphNet"
    assert fx.feature_info.channels() == default.feature_info.channels()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = default(x), fx(x)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        if name.startswith("spikformer"):
            # FX returns the blocks' outputs per time step (T, B, C, H, W); the default features are their time means
            assert g.shape == (kwargs.get("T", 4), *e.shape)
            g = g.mean(0)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"{name}: feature {i}")
    # the input checks are leaves of the traced graph, not removed by tracing
    with pytest.raises(ValueError, match="in_chans"):
        fx(torch.randn(1, 1, size, size))


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=IDS)
def test_fx_traced_classifier_matches_eager(name, kwargs, size):
    """The whole classifier traced with timm's leaves (what FX quantization and pruning tools do)."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer

    model = _create(name, kwargs)
    tracer = NodePathTracer(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    traced = torch.fx.GraphModule(model, tracer.trace(model))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=IDS)
def test_torch_export_and_onnx_match_eager(name, kwargs, size):
    model = _create(name, kwargs)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)

    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-6, msg="torch.export")

    onnx_program = torch.onnx.export(exported, dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4, msg="onnxruntime")


def test_every_family_is_covered():
    registry = timm.models._registry
    families = {fn.__module__ for fn in registry._model_entrypoints.values() if fn.__module__.startswith("backbones.")}
    assert sorted(registry._model_entrypoints[name].__module__ for name in IDS) == sorted(families)
