"""VAN family: ops.lka, parameter counts, official parity (fixtures from the official code), checkpoint loading
(official and Hugging Face transformers layouts) and the timm contract."""
import re
import sys
from contextlib import contextmanager

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones.van as van
from ops.lka import lka, lka_reference
from tests.parity_utils import assert_grad_checkpointing_matches, assert_rel_close, load_fixture, second_sample

FIXTURE = "van_tiny_cfg"
NAMES = [f"van_b{i}" for i in range(7)]
# the official models/van.py (1000 classes), counted with the official code
OFFICIAL_PARAMS = dict(van_b0=4_105_800, van_b1=13_861_800, van_b2=26_578_472, van_b3=44_765_608,
                       van_b4=60_283_176, van_b5=89_967_688, van_b6=199_829_416)
TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), num_classes=5)


@contextmanager
def float64_default():
    """Build models in float64 so that float64 fixture weights load without rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def fixture():
    sd, io, meta = load_fixture("van", FIXTURE)
    kw = meta["kwargs"]
    arch = dict(embed_dims=kw["embed_dims"], depths=kw["depths"], mlp_ratios=kw["mlp_ratios"],
                num_classes=kw["num_classes"])
    return sd, io, arch


def _load_pretrained(path, arch, **kwargs):
    """The download code path: timm's pretrained loader reading an official-format file."""
    with float64_default():
        model = timm.create_model("van_b0", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=arch["num_classes"]),
                                  **arch, **kwargs)
    return model.eval()


# ---- ops.lka -------------------------------------------------------------------------------------------------
def test_lka_reference_definition():
    g = torch.Generator().manual_seed(0)
    c = 3
    x = torch.randn(2, c, 9, 6, generator=g, dtype=torch.float64)
    w5, b5 = torch.randn(c, 1, 5, 5, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    w7, b7 = torch.randn(c, 1, 7, 7, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    w1, b1 = torch.randn(c, c, 1, 1, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    # per channel: zero-padded 'same' 5x5 conv, then a 7x7 conv with dilation 3, then a channel mix, then the gate
    a = F.conv2d(F.pad(x, [2] * 4), w5, b5, groups=c)
    a = F.conv2d(F.pad(a, [9] * 4), w7, b7, dilation=3, groups=c)
    expected = x * (torch.einsum("oi,bihw->bohw", w1[:, :, 0, 0], a) + b1[:, None, None])
    out = lka_reference(x, w5, b5, w7, b7, w1, b1)
    assert_rel_close(out, expected, 1e-12, "lka_reference")
    assert torch.equal(lka(x, w5, b5, w7, b7, w1, b1, impl="reference"), out)
    with pytest.raises(ValueError, match="w7 must have shape"):
        lka_reference(x, w5, b5, w5, b5, w1, b1)
    with pytest.raises(ValueError, match="impl must be one of"):
        lka(x, w5, b5, w7, b7, w1, b1, impl="cuda")


# ---- registry and parameter counts ---------------------------------------------------------------------------
def test_registry_no_overwrite():
    # every name is ours, and no timm model module defines it (timm registers its own at import, before ours)
    timm_modules = [m for n, m in list(sys.modules.items()) if n.startswith("timm.models.")]
    for name in NAMES:
        assert timm.models._registry._model_to_module[name] == "van"
        assert not any(hasattr(m, name) for m in timm_modules), f"timm already has {name}"
    tags = timm.list_pretrained("van_*")
    assert set(tags) == {f"van_b{i}.in1k" for i in range(5)} | {f"van_b{i}.in22k" for i in (4, 5, 6)}


@pytest.mark.parametrize("name", NAMES)
def test_param_count(name):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_pretrained_cfgs():
    for tag in timm.list_pretrained("van_*"):
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        for key in ("url", "license", "paper_ids", "origin_url", "paper_name", "crop_pct", "crop_mode",
                    "interpolation", "mean", "std", "first_conv", "classifier"):
            assert cfg.get(key), (tag, key)
        assert cfg["paper_ids"] == "arXiv:2202.09741" and cfg["interpolation"] == "bicubic"
    in1k = timm.models.get_pretrained_cfg("van_b0.in1k")
    assert (in1k.mean, in1k.std, in1k.crop_pct, in1k.num_classes) == ((0.5,) * 3, (0.5,) * 3, 0.9, 1000)
    assert timm.models.get_pretrained_cfg("van_b5.in22k").num_classes == 21841


# ---- parity with the official code ---------------------------------------------------------------------------
def test_parity_official_checkpoint(fixture, tmp_path):
    """Official '{state_dict: sd}' file through the pretrained loader; logits of the fixture and a batch of two."""
    sd, io, arch = fixture
    path = tmp_path / "van_official.pth.tar"
    torch.save({"state_dict": sd, "epoch": 299}, path)  # as published (timm train.py checkpoints)
    model = _load_pretrained(path, arch)
    x = io["input"].double()
    with torch.no_grad():
        assert_rel_close(model(x), io["logits"], 1e-6, "logits")
        assert_rel_close(model(second_sample(x))[:1], io["logits"], 1e-6, "batch-2 row 0")


def test_parity_stage_maps_features_only(fixture, tmp_path):
    """The ImageNet-22K code's '{model: sd}' layout with DDP prefixes, loaded as a features_only model."""
    sd, io, arch = fixture
    path = tmp_path / "van_22k_style.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 89}, path)
    model = _load_pretrained(path, arch, features_only=True)
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(io["input"].double())
    for i, f in enumerate(feats):
        assert_rel_close(f, io[f"stage{i}"], 1e-5, f"stage{i}")


def _to_transformers_keys(sd):
    """Official keys -> the Hugging Face transformers port's (VanForImageClassification) keys."""
    leaf = {"norm1": "pre_normomalization", "norm2": "post_normalization",
            "attn.proj_1": "attention.pre_projection.conv",
            "attn.spatial_gating_unit.conv0": "attention.attention_layer.attention.depth_wise",
            "attn.spatial_gating_unit.conv_spatial": "attention.attention_layer.attention.depth_wise_dilated",
            "attn.spatial_gating_unit.conv1": "attention.attention_layer.attention.point_wise",
            "attn.proj_2": "attention.post_projection", "mlp.fc1": "mlp.in_dense",
            "mlp.dwconv.dwconv": "mlp.depth_wise", "mlp.fc2": "mlp.out_dense",
            "layer_scale_1": "attention_scaling.weight", "layer_scale_2": "mlp_scaling.weight"}
    out = {}
    for k, v in sd.items():
        if m := re.match(r"patch_embed(\d)\.(proj|norm)\.(.*)", k):
            sub = "convolution" if m[2] == "proj" else "normalization"
            k = f"van.encoder.stages.{int(m[1]) - 1}.embeddings.{sub}.{m[3]}"
        elif m := re.match(r"block(\d)\.(\d+)\.(.*?)(\.(weight|bias|running_\w+|num_batches_tracked))?$", k):
            k = f"van.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.{leaf[m[3]]}{m[4] or ''}"
        elif m := re.match(r"norm(\d)\.(.*)", k):
            k = f"van.encoder.stages.{int(m[1]) - 1}.normalization.{m[2]}"
        else:
            k = k.replace("head.", "classifier.")
        out[k] = v
    c = sd["norm4.weight"].shape[0]
    out["van.layernorm.weight"], out["van.layernorm.bias"] = torch.randn(c), torch.randn(c)  # unused by the port
    return out


def test_parity_transformers_checkpoint(fixture, tmp_path):
    sd, io, arch = fixture
    path = tmp_path / "pytorch_model.bin"
    torch.save(_to_transformers_keys(sd), path)
    model = _load_pretrained(path, arch)
    with torch.no_grad():
        assert_rel_close(model(io["input"].double()), io["logits"], 1e-6, "logits (transformers keys)")


def test_bad_checkpoint(fixture):
    sd, _, arch = fixture
    model = timm.create_model("van_b0", **arch)
    missing = {k: v for k, v in sd.items() if not k.startswith("block2.0.attn.spatial_gating_unit.conv_spatial")}
    with pytest.raises(ValueError, match=r"missing key\(s\): stages\.1\.blocks\.0\.attn\.spatial_gating_unit"):
        van.checkpoint_filter_fn(missing, model)
    wrong = dict(sd, **{"block1.0.mlp.fc1.weight": torch.zeros(3, 8, 1, 1)})
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\): stages\.0\.blocks\.0\.mlp\.fc1\.weight"):
        van.checkpoint_filter_fn(wrong, model)


# ---- timm contract on a tiny config --------------------------------------------------------------------------
def test_any_resolution_and_bad_channels():
    model = timm.create_model("van_b0", **TINY).eval()
    with torch.no_grad():
        for h, w in ((1, 1), (37, 50)):
            assert model(torch.randn(1, 3, h, w)).shape == (1, 5)
        feats = model.forward_intermediates(torch.randn(1, 3, 37, 50), intermediates_only=True)
    # each stride-s conv with padding k//2 maps n -> ceil(n / s)
    assert [tuple(f.shape[-2:]) for f in feats] == [(10, 13), (5, 7), (3, 4), (2, 2)]
    with pytest.raises(ValueError, match="in_chans=3 but the input has 1 channels"):
        model(torch.randn(1, 1, 32, 32))


def test_in_chans_and_classifier():
    model = timm.create_model("van_b0", **dict(TINY, in_chans=1)).eval()
    x = torch.randn(2, 1, 40, 24)
    assert model(x).shape == (2, 5)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 32, 2, 1)


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    model = timm.create_model("van_b0", **TINY).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert torch.equal(inter[-1], final)
        assert [f.shape[1] for f in inter] == [8, 16, 24, 32]
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert len(early) == 1 and torch.equal(early[0], inter[1])
        feat_model = timm.create_model("van_b0", features_only=True, out_indices=(1, 2), **TINY).eval()
        missing, _ = feat_model.model.load_state_dict(model.state_dict(), strict=False)  # extra: pruned head/stage
        assert not missing
        feats = feat_model(x)
    assert feat_model.feature_info.channels() == [16, 24] and feat_model.feature_info.reduction() == [8, 16]
    assert len(feat_model.model.stages) == 3  # pruned after the last wanted stage
    assert torch.equal(feats[0], inter[1]) and torch.equal(feats[1], inter[2])


def test_grad_checkpointing(monkeypatch):
    torch.manual_seed(0)
    assert_grad_checkpointing_matches(timm.create_model("van_b0", **TINY).eval(), torch.randn(2, 3, 32, 32), monkeypatch)


def test_train_step_and_group_matcher():
    torch.manual_seed(0)
    model = timm.create_model("van_b0", drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2, **TINY).train()
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert groups[0] == [n for n, _ in model.named_parameters() if n.startswith("stages.0.downsample")]
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
