"""DaViT: ops, parameter counts, parity (official repo, timm and Florence-2 layouts), the timm contract, bad input."""
import re
import subprocess
import sys
from contextlib import contextmanager

import pytest
import timm
import torch
import torch.nn.functional as F
import timm.models._registry as registry

import backbones.davit as davit
from ops.channel_attention import channel_attention, channel_attention_reference
from ops.window_attention import window_attention, window_attention_reference
from parity_utils import assert_grad_checkpointing_matches, assert_rel_close, load_fixture, second_sample

OFFICIAL_FIXTURES = ["davit_official_tiny_cfg", "davit_official_tiny_overlap_noffn_cfg"]
TIMM_FIXTURES = ["davit_timm_tiny_cfg", "davit_timm_opts_tiny_cfg", "davit_timm_fl_tiny_cfg"]
NAMES = ["davit_t", "davit_s", "davit_b", "davit_l", "davit_h", "davit_g", "davit_b_fl", "davit_h_fl"]
# t/s/b/l: the official code's counts (comments in dingmyu/davit timm/models/davit.py); h/g/fl: timm's DaVit
PARAMS = dict(davit_t=28_360_168, davit_s=49_745_896, davit_b=87_954_408, davit_l=196_811_752,
              davit_h=348_922_856, davit_g=1_406_470_120, davit_b_fl=90_370_048, davit_h_fl=360_636_416)
# the fixtures' size: every pad path (stem, downsample, window) and both channel-attention versions are small
TINY = dict(depths=(1, 1, 2, 1), embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 2, 4), window_size=3, mlp_ratio=2.0,
            num_classes=10)


@contextmanager
def float64_default():
    """Build models in float64 so that float64 fixture weights load without rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _fixture(name):
    """(official state_dict, io, our model kwargs, hub name) of a fixture."""
    sd, io, meta = load_fixture("davit", name)
    kw = dict(meta["kwargs"])
    if name in OFFICIAL_FIXTURES:  # the official DaViT(...) arguments -> ours
        kw = dict(num_classes=kw["num_classes"], depths=kw["depths"], embed_dims=kw["embed_dims"],
                  num_heads=kw["num_heads"], window_size=kw["window_size"], mlp_ratio=kw["mlp_ratio"],
                  qkv_bias=kw["qkv_bias"], attn_types=kw["attention_types"], ffn=kw["ffn"],
                  down_kernel_size=3 if kw["overlapped_patch"] else 2)
    return sd, io, kw, "davit_b_fl" if kw.get("channel_attn_v2") else "davit_t"


def _load_pretrained(name, path, kw, **kwargs):
    """The download code path: timm's pretrained loader reading a local file."""
    with float64_default():
        model = timm.create_model(name, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=kw["num_classes"]),
                                  **kw, **kwargs)
    return model.eval()


# ---- ops -------------------------------------------------------------------------------------------------------
def test_window_attention_definition():
    g = torch.Generator().manual_seed(0)
    B, H, W, heads, d, ws = 2, 6, 4, 2, 3, 2
    qkv = torch.randn(B, H, W, 3 * heads * d, generator=g, dtype=torch.float64)
    out = window_attention(qkv, heads, ws)
    q, k, v = qkv.reshape(B, H, W, 3, heads, d).unbind(3)
    for i in range(0, H, ws):  # one window, written out
        for j in range(0, W, ws):
            win = lambda t: t[:, i:i + ws, j:j + ws].reshape(B, ws * ws, heads, d).transpose(1, 2)
            a = (win(q) @ win(k).transpose(-2, -1) * d ** -0.5).softmax(-1) @ win(v)
            ref = a.transpose(1, 2).reshape(B, ws, ws, heads * d)
            assert_rel_close(out[:, i:i + ws, j:j + ws], ref, 1e-12, f"window {i},{j}")
    with pytest.raises(ValueError, match="divisible by the window"):
        window_attention_reference(qkv[:, :5], heads, ws)
    with pytest.raises((ValueError, RuntimeError)):
        window_attention(qkv, heads, ws, impl="triton")


def test_channel_attention_definition():
    g = torch.Generator().manual_seed(0)
    B, N, heads, d = 2, 7, 2, 3
    qkv = torch.randn(B, N, 3 * heads * d, generator=g, dtype=torch.float64)
    q, k, v = qkv.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    v1 = (k.transpose(-2, -1) @ v * d ** -0.5).softmax(-1)  # k^T v forms the map, applied to q
    v2 = (q.transpose(-2, -1) @ k * N ** -0.5).softmax(-1)  # Florence-2: q^T k, scaled by tokens
    for version, ref in ((1, q @ v1.transpose(-2, -1)), (2, v @ v2.transpose(-2, -1))):
        ref = ref.transpose(1, 2).reshape(B, N, heads * d)
        assert_rel_close(channel_attention(qkv, heads, version), ref, 1e-12, f"version {version}")
    with pytest.raises(ValueError, match="version"):
        channel_attention_reference(qkv, heads, 3)


# ---- registry, counts, cfgs -------------------------------------------------------------------------------------
def test_registry_no_overwrite():
    code = "import warnings; warnings.simplefilter('always'); import backbones.davit"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Overwriting" not in res.stderr, res.stderr
    ours = sorted(n for n, fn in registry._model_entrypoints.items() if fn.__module__ == "backbones.davit")
    assert ours == sorted(NAMES)
    assert registry._model_entrypoints["davit_tiny"].__module__ == "timm.models.davit"


@pytest.mark.parametrize("name", NAMES)
def test_param_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_pretrained_cfgs():
    tags = [n for n in timm.list_pretrained("davit_*") if n.split(".")[0] in NAMES]
    assert sorted(tags) == sorted(["davit_t.msft_in1k", "davit_s.msft_in1k", "davit_b.msft_in1k",
                                   "davit_b_fl.msft_florence2", "davit_h_fl.msft_florence2"])
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.hf_hub_id and cfg.license == "mit" and cfg.paper_ids.startswith("arXiv:") and cfg.origin_url
        assert cfg.interpolation == "bicubic" and cfg.first_conv == "stem.conv" and cfg.classifier == "head.fc"
    t = timm.models.get_pretrained_cfg("davit_t.msft_in1k")
    assert t.hf_hub_id == "timm/davit_tiny.msft_in1k" and t.url.startswith("https://")
    assert (t.input_size, t.crop_pct, t.crop_mode) == ((3, 224, 224), 0.9, "center")  # the authors' validate.py
    fl = timm.models.get_pretrained_cfg("davit_b_fl.msft_florence2")
    assert (fl.num_classes, fl.input_size, fl.crop_mode) == (0, (3, 768, 768), "squash")


# ---- parity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OFFICIAL_FIXTURES + TIMM_FIXTURES)
def test_parity_logits(name, tmp_path):
    """Each fixture's checkpoint, saved as published, through the pretrained loader: logits, batch of two."""
    sd, io, kw, hub_name = _fixture(name)
    path = tmp_path / "ckpt.pth"
    if name in OFFICIAL_FIXTURES:  # the official train.py checkpoint: EMA copy and DDP prefix
        ckpt = {"state_dict": {k: torch.zeros_like(v) for k, v in sd.items()},
                "state_dict_ema": {"module." + k: v for k, v in sd.items()}, "epoch": 299}
    else:  # timm hub files are a flat state_dict
        ckpt = sd
    torch.save(ckpt, path)
    model = _load_pretrained(hub_name, path, kw)
    x = io["input"].double()
    with torch.no_grad():
        assert_rel_close(model(x), io["logits"], 1e-6, "logits")
        assert_rel_close(model(second_sample(x))[:1], io["logits"], 1e-6, "batch-2 row 0")


@pytest.mark.parametrize("name", OFFICIAL_FIXTURES + TIMM_FIXTURES)
def test_parity_stage_maps_features_only(name, tmp_path):
    sd, io, kw, hub_name = _fixture(name)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    model = _load_pretrained(hub_name, path, kw, features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(io["input"].double())
    for i, f in enumerate(feats):
        assert_rel_close(f, io[f"stage{i}"], 1e-5, f"stage{i}")


def test_timm_state_dict_loads_identically(tmp_path):
    """A state_dict of timm's own davit_tiny (the layout of timm's hub weights) gives timm's outputs."""
    torch.manual_seed(0)
    ref = timm.create_model("davit_tiny").eval()
    with torch.no_grad():
        for p in ref.state_dict().values():  # no identity norms or zero biases
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "model.pth"
    torch.save(ref.state_dict(), path)
    model = timm.create_model("davit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 60, 46)  # not a multiple of the window 7 at any stage
    with torch.no_grad():
        assert_rel_close(model(x), ref(x), 1e-5, "logits vs timm davit_tiny")
        headless = timm.create_model("davit_t", pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay=dict(file=str(path))).eval()
        assert_rel_close(headless(x), ref.forward_head(ref.forward_features(x), pre_logits=True), 1e-5, "pre-logits")


def _to_florence_keys(sd):
    """Our (timm) layout -> Florence-2's image-encoder layout, as in the Florence-2 checkpoints."""
    rules = [(r"^stem\.", "convs.0."), (r"^stages\.(\d+)\.downsample\.conv\.", r"convs.\1.proj."),
             (r"^stages\.(\d+)\.downsample\.norm\.", r"convs.\1.norm."), (r"^stages\.(\d+)\.blocks\.", r"blocks.\1."),
             (r"^convs\.0\.conv\.", "convs.0.proj."), (r"\.cpe1\.proj\.", ".conv1.fn.dw."),
             (r"\.cpe2\.proj\.", ".conv2.fn.dw."), (r"(spatial_block)\.norm1\.", r"\1.window_attn.norm."),
             (r"(spatial_block)\.attn\.", r"\1.window_attn.fn."), (r"(channel_block)\.norm1\.", r"\1.channel_attn.norm."),
             (r"(channel_block)\.attn\.", r"\1.channel_attn.fn."), (r"\.norm2\.", ".ffn.norm."),
             (r"\.mlp\.", ".ffn.fn.net.")]
    out = {}
    for k, v in sd.items():
        for p, r in rules:
            k = re.sub(p, r, k)
        out[k] = v
    return out


def test_florence2_layout():
    """Florence-2's encoder keys (cross-checked with timm's own converter) load and give the fixture's stage maps."""
    sd, io, kw, _ = _fixture("davit_timm_fl_tiny_cfg")
    encoder = _to_florence_keys({k: v for k, v in sd.items() if not k.startswith("head.")})
    assert timm.models.davit._convert_florence2({"vision_tower." + k: v for k, v in encoder.items()}, None).keys() \
        == {k for k in sd if not k.startswith("head.")}
    ckpt = {"vision_tower." + k: v for k, v in encoder.items()}
    ckpt.update({"language_model.lm_head.weight": torch.zeros(3, 2), "image_projection": torch.zeros(2, 2)})
    with float64_default():
        model = davit.DaVit(**dict(kw, num_classes=0)).eval()
    model.load_state_dict(davit.checkpoint_filter_fn(ckpt, model))
    with torch.no_grad():
        feats = model.forward_intermediates(io["input"].double(), intermediates_only=True)
    for i, f in enumerate(feats):
        assert_rel_close(f, io[f"stage{i}"], 1e-5, f"stage{i}")


# ---- bad input -------------------------------------------------------------------------------------------------
def test_bad_checkpoint():
    sd, _, kw, _ = _fixture("davit_official_tiny_cfg")
    model = davit.DaVit(**kw)
    missing = {k: v for k, v in sd.items() if k != "main_blocks.2.1.1.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"missing key.*stages\.2\.blocks\.1\.1\.attn\.qkv\.weight"):
        davit.checkpoint_filter_fn(missing, model)
    bad = dict(sd, **{"main_blocks.0.0.0.cpe.0.proj.weight": torch.zeros(8, 1, 5, 5)})
    with pytest.raises(ValueError, match=r"mis-shaped.*stages\.0\.blocks\.0\.0\.cpe1\.proj\.weight"):
        davit.checkpoint_filter_fn(bad, model)


def test_any_resolution_and_bad_channels():
    model = timm.create_model("davit_t", **TINY).eval()
    with torch.no_grad():
        for size in [(1, 1), (13, 7), (33, 50)]:  # every size pads as the official code
            assert model(torch.randn(1, 3, *size)).shape == (1, 10)
        with pytest.raises(ValueError, match="in_chans=3 but the input has 4 channels"):
            model(torch.randn(1, 4, 32, 32))
        with pytest.raises(ValueError, match="4-D"):
            model(torch.randn(3, 32, 32))


# ---- timm contract ---------------------------------------------------------------------------------------------
def test_in_chans_and_classifier():
    model = timm.create_model("davit_t", in_chans=1, **TINY).eval()
    x = torch.randn(2, 1, 40, 36)
    assert model(x).shape == (2, 10)
    feats = model.forward_features(x)
    assert feats.shape == (2, 32, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    opts = timm.create_model("davit_t", head_norm_first=True, **TINY).eval()
    opts.reset_classifier(3, "max")
    assert opts(torch.randn(1, 3, 40, 36)).shape == (1, 3)


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    model = timm.create_model("davit_t", **TINY).eval()
    x = torch.randn(1, 3, 45, 38)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [f.shape[1] for f in inter] == [8, 16, 24, 32]
        assert [f.shape[-2:] for f in inter] == [(12, 10), (6, 5), (3, 3), (2, 2)]
        assert torch.equal(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert len(early) == 1 and torch.equal(early[0], inter[1])
        feat_model = timm.create_model("davit_t", features_only=True, out_indices=(1, 2), **TINY).eval()
        feat_model.model.load_state_dict(model.state_dict(), strict=False)
        feats = feat_model(x)
    assert feat_model.feature_info.channels() == [16, 24] and feat_model.feature_info.reduction() == [8, 16]
    assert len(feat_model.model.stages) == 3  # pruned after the last wanted stage
    assert torch.equal(feats[0], inter[1]) and torch.equal(feats[1], inter[2])


def test_grad_checkpointing(monkeypatch):
    torch.manual_seed(0)
    assert_grad_checkpointing_matches(timm.create_model("davit_t", **TINY).eval(), torch.randn(2, 3, 32, 30), monkeypatch)


def test_train_step_and_group_matcher():
    torch.manual_seed(0)
    model = timm.create_model("davit_t", drop_rate=0.1, drop_path_rate=0.2, ffn=False, **TINY).train()
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for d in s.blocks for b in d]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.2) < 1e-9 and rates == sorted(rates)  # per sub-block, as official
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert groups[0] == [n for n, _ in model.named_parameters() if n.startswith("stem")]
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
