"""HaloNet: parity with timm's ByobNet HaloNets (the reference), timm weights loading, the op, the timm contract."""
import pytest
import timm
import torch
import torch.nn.functional as F

import backbones.halonet as halonet
from backbones.halonet import StageCfg
from ops.halo_attention import halo_attention, halo_attention_reference
from parity_utils import assert_rel_close, load_fixture, second_sample

# The fixtures' ByoModelCfgs (json "cfg_source") in this family's terms.
FIXTURE_CFGS = {
    "halonet_h1_tiny_cfg": ("halo_h1", dict(
        stages=(StageCfg("h", 16, 1, 1.0), StageCfg("hh", 24, 2, 1.0), StageCfg("h", 32, 2, 1.0),
                StageCfg("h", 48, 2, 1.0)),
        halo=dict(block_size=4, halo_size=1, num_heads=2), stem_type="7x7", stem_chs=16, stem_pool=True,
        num_features=0, act_layer="relu")),
    "halonet_tiny_cfg": ("halo_seresnet33ts", dict(
        stages=(StageCfg("c", 16, 1, attn_layer="eca"), StageCfg("ch", 32, 2, group_size=4),
                StageCfg("hh", 48, 2, bottle_ratio=0.5, halo=dict(block_size=4, halo_size=1, num_heads=2, dim_head=8)),
                StageCfg("h", 64, 2)),
        halo=dict(block_size=4, halo_size=2, num_heads=2), stem_type="tiered", stem_chs=16, stem_pool=False,
        num_features=96, act_layer="silu", attn_layer="se")),
    "haloregnetz_tiny_cfg": ("halo_regnetz_b", dict(
        stages=(StageCfg("c", 8, 2, 3, 8), StageCfg("cc", 16, 2, 3, 8), StageCfg("ch", 24, 2, 3, 8),
                StageCfg("h", 32, 2, 3, 8)),
        halo=dict(block_size=3, halo_size=1, qk_ratio=0.33, num_heads=2), stem_type="3x3", stem_chs=8,
        stem_pool=False, num_features=64, act_layer="silu", attn_layer="se", attn_kwargs=dict(rd_ratio=0.25),
        proj_shortcut=False, bottle_in=True, linear_out=True)),
}
# checkpoints as published: timm's releases are flat state_dicts; also nested / DDP-prefixed forms
NESTINGS = {
    "halonet_h1_tiny_cfg": lambda sd: sd,
    "halonet_tiny_cfg": lambda sd: {"state_dict": sd, "epoch": 300},
    "haloregnetz_tiny_cfg": lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
}
TINY_NAME, TINY = FIXTURE_CFGS["halonet_tiny_cfg"]  # every block kind, strided and plain halo layers

HUB_TO_TIMM = {"halo_resnet26t": "halonet26t", "halo_seresnet33ts": "sehalonet33ts", "halo_resnet50ts": "halonet50ts",
               "halo_ecaresnext26ts": "eca_halonext26ts", "halo_regnetz_b": "haloregnetz_b"}


def _randomize(model, seed=0):
    """Every float parameter/buffer random (BN scales and variances in [0.5, 1.5]) so no block is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if n.endswith("running_var") or (t.ndim == 1 and n.endswith(".weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim > 1:
                t.copy_(torch.randn(t.shape, generator=g) * t[0].numel() ** -0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("fixture", list(FIXTURE_CFGS))
def test_parity_with_reference(fixture, tmp_path):
    weights, io, meta = load_fixture("halonet", fixture)
    name, cfg = FIXTURE_CFGS[fixture]
    path = tmp_path / "checkpoint.pth"
    torch.save(NESTINGS[fixture](weights), path)
    # loaded through timm's pretrained machinery, as a download is
    model = timm.create_model(name, pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **cfg)
    model = model.double().eval()
    x = io["input"].double()
    with torch.no_grad():
        assert_rel_close(model(x), io["logits"], 1e-6, "logits")
        assert_rel_close(model(second_sample(x))[:1], io["logits"], 1e-6, "logits, row 0 of a batch of 2")
        feats = timm.create_model(name, features_only=True, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **cfg)
        maps = feats.double().eval()(x)
        assert len(maps) == 4
        for i, f in enumerate(maps):
            assert_rel_close(f, io[f"stage{i}"], 1e-5, f"stage{i}")


@pytest.mark.parametrize("name", list(HUB_TO_TIMM))
def test_loads_timm_weights(name):
    """timm's model with random weights; its state_dict converted into ours gives the same eval outputs."""
    with torch.device("meta"):  # skip both inits: every tensor is overwritten
        ref, model = timm.create_model(HUB_TO_TIMM[name]), timm.create_model(name)
    ref = _randomize(ref.to_empty(device="cpu")).eval()
    model.load_state_dict(halonet.checkpoint_filter_fn(ref.state_dict(), model), assign=True)
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_rel_close(model.eval()(x), ref(x), 1e-5, name)


COUNTS = {
    "halo_h0": 5_500_952, "halo_h1": 8_100_056, "halo_h2": 9_404_312, "halo_h3": 11_841_304,
    "halo_h4": 19_101_976, "halo_h5": 30_717_272, "halo_h6": 43_456_792, "halo_h7": 67_433_240,
    "halo_resnet26t": 12_480_288, "halo_seresnet33ts": 13_691_712, "halo_resnet50ts": 22_733_280,
    "halo_ecaresnext26ts": 10_756_885, "halo_regnetz_b": 11_680_072,
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_param_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == COUNTS[name]
    official = dict(HUB_TO_TIMM, halo_h1="halonet_h1").get(name)
    if official:  # same count as timm's model, and its full-size state_dict converts key for key
        with torch.device("meta"):
            ref = timm.create_model(official)
        assert sum(p.numel() for p in ref.parameters()) == COUNTS[name]
        halonet.checkpoint_filter_fn(ref.state_dict(), model)


def test_h_series_match_paper_table():
    # paper's model-family table (params in M, one decimal); H6: ours 43.46 vs paper 43.4 (see module docstring)
    paper = dict(halo_h0=5.5, halo_h1=8.1, halo_h2=9.4, halo_h3=11.8, halo_h4=19.1, halo_h5=30.7, halo_h7=67.4)
    for name, m in paper.items():
        assert round(COUNTS[name] / 1e6, 1) == m, name


def test_pretrained_cfgs():
    for name, official in HUB_TO_TIMM.items():
        tags = [n for n in timm.list_pretrained(name + ".*")]
        assert len(tags) == 1, tags
        cfg = timm.models.get_pretrained_cfg(tags[0]).to_dict()
        ref = timm.models.get_pretrained_cfg(timm.list_pretrained(official + ".*")[0]).to_dict()
        assert cfg["hf_hub_id"] == f"timm/{official}.{tags[0].split('.')[1]}" and cfg["url"] == ref["url"]
        for k in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes"):
            assert cfg[k] == ref[k], (name, k)
        assert cfg["paper_ids"] == "arXiv:2103.12731" and cfg["license"] == "apache-2.0"
        assert cfg["crop_mode"] == "center" and cfg["first_conv"] == "stem.conv1.conv"
    assert timm.models.get_pretrained_cfg("halo_regnetz_b.ra3_in1k").mean == (0.5, 0.5, 0.5)


def _naive_halo_attention(q, k, v, rel_h, rel_w, block, halo, stride):
    """The op's docstring, literally: per block an explicit zero-padded window, per query explicit relative indices."""
    B, nh, dqk, H, W = k.shape
    bq, win = block // stride, block + 2 * halo
    ky, kx = torch.arange(win).repeat_interleave(win), torch.arange(win).repeat(win)  # window position, row-major
    kp, vp = F.pad(k, [halo] * 4), F.pad(v, [halo] * 4)
    rows = []
    for qi in range(H // stride):
        cols = []
        for qj in range(W // stride):
            (i, qy), (j, qx) = divmod(qi, bq), divmod(qj, bq)
            kw = kp[..., i * block:i * block + win, j * block:j * block + win].flatten(-2)  # (B, nh, d, win*win)
            vw = vp[..., i * block:i * block + win, j * block:j * block + win].flatten(-2)
            qv = q[..., qi, qj]  # (B, nh, dqk)
            logits = torch.einsum("bnd,bndk->bnk", qv, kw) * dqk ** -0.5
            logits = logits + qv @ rel_h[ky - qy + win - 1].T + qv @ rel_w[kx - qx + win - 1].T
            cols.append(torch.einsum("bnk,bndk->bnd", logits.softmax(-1), vw))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2).flatten(1, 2)


@pytest.mark.parametrize("block,halo,stride,dqk,dv",
                         [(4, 1, 1, 3, 3), (4, 2, 2, 4, 6), (3, 1, 1, 2, 5), (2, 0, 2, 3, 2)])
def test_op_matches_its_definition(block, halo, stride, dqk, dv):
    g = torch.Generator().manual_seed(0)
    H, W, win = 2 * block, 3 * block, block + 2 * halo
    kv = torch.randn(2, 2, dqk + dv, H, W, dtype=torch.float64, generator=g).requires_grad_()
    q = torch.randn(2, 2, dqk, H // stride, W // stride, dtype=torch.float64, generator=g).requires_grad_()
    rel = torch.randn(2, 2 * win - 1, dqk, dtype=torch.float64, generator=g).requires_grad_()
    k, v = kv.split([dqk, dv], 2)  # non-contiguous views, as the model passes them
    out = halo_attention(q, k, v, rel[0], rel[1], block, halo, stride)
    ref = _naive_halo_attention(q, k, v, rel[0], rel[1], block, halo, stride)
    assert out.shape == (2, 2 * dv, H // stride, W // stride) and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, kv, rel), grad), torch.autograd.grad(ref, (q, kv, rel), grad)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="divisible by block_size"):
        halo_attention_reference(q, k[..., :-1], v[..., :-1], rel[0], rel[1], block, halo, stride)
    with pytest.raises(ValueError, match="Triton kernel does not support"):
        halo_attention(q, k, v, rel[0], rel[1], block, halo, stride, impl="triton")


def test_timm_contract():
    model = _randomize(timm.create_model(TINY_NAME, num_classes=10, **TINY)).eval()
    x = torch.randn(2, 3, 64, 128)  # a second, non-square resolution (fixture: 128x192)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 96, 2, 4)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 96)
        assert model(x).shape == (2, 10)
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [16, 32, 48, 64] and [t.shape[-1] for t in inter] == [32, 16, 8, 4]
        torch.testing.assert_close(final, feats)
        only = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert len(only) == 1 and torch.equal(only[0], inter[1])
    assert model.no_weight_decay() == {f"stages.{s}.self_attn.rel_pos_{a}" for s in ("1.1", "2.0", "2.1", "3.0")
                                       for a in "hw"}
    assert model.group_matcher()["stem"] == r"^stem"
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 96)
    fm = timm.create_model(TINY_NAME, features_only=True, out_indices=(1, 3), **TINY)
    assert fm.feature_info.channels() == [32, 64] and fm.feature_info.reduction() == [8, 32]
    assert [t.shape[1] for t in fm(x)] == [32, 64]
    pruned = timm.create_model(TINY_NAME, **TINY)
    pruned.prune_intermediate_layers([1], prune_norm=True)
    assert len(pruned.stages) == 2 and pruned.num_classes == 0
    one = timm.create_model(TINY_NAME, in_chans=1, num_classes=10, **TINY)
    assert one(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_grad_checkpointing_same_output_and_grads():
    model = _randomize(timm.create_model(TINY_NAME, num_classes=10, **TINY)).train()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    model.stages[2][1].register_forward_pre_hook(lambda *a: calls.append(1))
    out = model(x)
    out.sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in ref.items() if "self_attn" in n), "no gradient reaches the attention"
    model.zero_grad()
    model.set_grad_checkpointing(True)
    calls.clear()
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    assert len(calls) == 2, "with checkpointing, stage 2 must be recomputed in backward"
    torch.testing.assert_close(out_ckpt, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_bad_inputs():
    model = timm.create_model(TINY_NAME, **TINY).eval()
    assert model.input_multiple == 64  # halo layers (block 4) read maps at strides 8 and 16
    with pytest.raises(ValueError, match="in_chans=3 but the input has 1 channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible by 64, got 64x96"):
        model(torch.randn(1, 3, 64, 96))
    weights, _, _ = load_fixture("halonet", "halonet_tiny_cfg")
    small = timm.create_model(TINY_NAME, num_classes=10, **TINY)
    missing = {k: v for k, v in weights.items() if "pos_embed" not in k}
    with pytest.raises(ValueError, match=r"missing key\(s\): stages.1.1.self_attn.rel_pos_h"):
        halonet.checkpoint_filter_fn(missing, small)
    shaped = dict(weights, **{"stages.3.0.self_attn.q.weight": torch.zeros(3, 16, 1, 1)})
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\): stages.3.0.self_attn.q.weight"):
        halonet.checkpoint_filter_fn(shaped, small)
    with pytest.raises(ValueError, match="block kinds are 'c'"):
        timm.create_model(TINY_NAME, **dict(TINY, stages=(StageCfg("x", 16, 1),)))
