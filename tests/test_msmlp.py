"""MS-MLP: the mix-shift op, parity with the official implementation, the timm contract, bad input."""
import contextlib
import subprocess
import sys

import pytest
import timm
import torch
from timm.models._manipulate import group_parameters

import backbones.msmlp as msmlp
from ops.mix_shift import mix_shift, mix_shift_reference
from parity_utils import assert_rel_close, load_fixture, second_sample

FIXTURE = "msmlp_tinycfg_128x160"
# a small MS-MLP for behaviour tests: widths 10/20/40/80 split into 5 even groups, all kernel sizes 1..7
TINY = dict(embed_dim=10, depths=(1, 1, 1, 1), num_classes=10)


def _fixture():
    """Official state_dict, io, and our kwargs for the official constructor kwargs of the fixture."""
    weights, io, meta = load_fixture("msmlp", FIXTURE)
    kw = meta["kwargs"]
    # fixed in every official config; ours derives the group count from shift_dist and always norms the stem
    assert kw["shift_size"] == len(kw["shift_dist"]) and kw["patch_norm"]
    kwargs = {k: kw[k] for k in ("in_chans", "num_classes", "embed_dim", "depths", "patch_size", "shift_dist",
                                 "mix_size", "mlp_ratio")}
    return weights, io, kwargs


@contextlib.contextmanager
def _float64():
    """Build models in float64 so official float64 weights load without rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---- the op ------------------------------------------------------------------------------------------------------
def _mix_shift_by_index(x, weights, biases, shifts):
    """The op's docstring formula, written with explicit index arithmetic (no torch.roll / conv)."""
    B, C, H, W = x.shape
    size = -(-C // len(shifts))
    out = torch.zeros_like(x)
    for d, (ws, bs) in enumerate(zip(weights, biases)):
        for g, (w, b, s) in enumerate(zip(ws, bs, shifts)):
            c0 = g * size
            xg = x[:, c0:c0 + w.shape[0]]
            kh, kw = w.shape[-2:]
            acc = b.view(1, -1, 1, 1).expand(B, -1, H, W).clone()
            for i in range(kh):
                for j in range(kw):
                    hh = torch.arange(H) + i - kh // 2
                    ww = torch.arange(W) + j - kw // 2
                    valid = ((hh >= 0) & (hh < H))[:, None] & ((ww >= 0) & (ww < W))[None, :]
                    src_h = (hh - s) % H if d == 1 else hh % H  # direction 1 ("td") rolls H
                    src_w = (ww - s) % W if d == 0 else ww % W  # direction 0 ("lr") rolls W
                    tap = xg[:, :, src_h][:, :, :, src_w] * valid
                    acc += w[:, 0, i, j].view(1, -1, 1, 1) * tap
            out[:, c0:c0 + w.shape[0]] += acc
    return out


def test_mix_shift_matches_index_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, 6, generator=g, dtype=torch.float64)  # 9 channels: uneven groups 2,2,2,2,1
    shifts, kernels, chunks = (-2, -1, 0, 1, 7), (1, 3, 5, 7, 3), (2, 2, 2, 2, 1)  # 7 > H, W: wraps more than once
    weights = [[torch.randn(c, 1, k, k, generator=g, dtype=torch.float64) for c, k in zip(chunks, kernels)]
               for _ in range(2)]
    biases = [[torch.randn(c, generator=g, dtype=torch.float64) for c in chunks] for _ in range(2)]
    expected = _mix_shift_by_index(x, weights, biases, shifts)
    torch.testing.assert_close(mix_shift_reference(x, weights, biases, shifts), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix_shift(x, weights, biases, shifts, impl="reference"), expected,
                               rtol=1e-12, atol=1e-12)
    # the two directions differ (a H/W mix-up would not be caught otherwise)
    swapped = mix_shift_reference(x, weights[::-1], biases[::-1], shifts)
    assert not torch.allclose(swapped, expected)


def test_mix_shift_errors():
    x = torch.randn(1, 8, 4, 4)  # torch.chunk(8 channels, 5) gives only 4 chunks
    w = [[torch.randn(2, 1, 1, 1)] * 5] * 2
    b = [[None] * 5] * 2
    with pytest.raises(ValueError, match="give 4 groups, not 5"):
        mix_shift(x, w, b, (-2, -1, 0, 1, 2))
    with pytest.raises(ValueError, match="odd sizes"):
        mix_shift_reference(torch.randn(1, 5, 4, 4), [[torch.randn(1, 1, 2, 2)] * 5] * 2, b, (-2, -1, 0, 1, 2))


# ---- parity with the official code --------------------------------------------------------------------------------
def test_parity_with_official_through_pretrained_loader(tmp_path):
    """Official-format file (nested under 'model' with the training state, as released) -> timm's pretrained path."""
    weights, io, kwargs = _fixture()
    path = tmp_path / "msmlp_tiny_patch4_ckpt_epoch299.pth"
    torch.save({"model": weights, "epoch": 299, "max_accuracy": 82.1}, path)
    x = io["input"].double()
    overlay = dict(file=str(path), num_classes=10)  # the fixture's 10-class head is loaded, not re-initialised
    with _float64():
        model = timm.create_model("msmlp_t", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        feats = timm.create_model("msmlp_t", pretrained=True, features_only=True, pretrained_cfg_overlay=overlay,
                                  **kwargs)
    model, feats = model.eval(), feats.eval()
    assert model.stem[0].weight.dtype == torch.float64
    with torch.no_grad():
        assert_rel_close(model(x), io["logits"], 1e-6, "logits")
        assert_rel_close(model(second_sample(x))[:1], io["logits"], 1e-6, "logits, row 0 of a batch of 2")
        assert_rel_close(model.forward_head(model.forward_features(x), pre_logits=True), io["pre_logits"], 1e-5,
                         "pre_logits")
        maps = feats(x)
        assert [tuple(m.shape[-2:]) for m in maps] == [(32, 40), (16, 20), (8, 10), (4, 5)]
        for i, f in enumerate(maps):
            assert_rel_close(f, io[f"stage{i}"], 1e-5, f"stage{i}")


def test_checkpoint_filter_nestings_and_our_layout():
    weights, io, kwargs = _fixture()
    model = timm.create_model("msmlp_t", **kwargs).double().eval()
    ours = msmlp.checkpoint_filter_fn({"state_dict": {"module." + k: v for k, v in weights.items()}}, model)
    assert "stages.1.downsample.0.weight" in ours and "head.fc.weight" in ours
    assert list(msmlp.checkpoint_filter_fn(ours, model)) == list(ours)  # our layout passes through
    model.load_state_dict(ours)
    with torch.no_grad():
        assert_rel_close(model(io["input"].double()), io["logits"], 1e-6, "logits")


@pytest.mark.parametrize("name,count", [("msmlp_t", 28_656_232), ("msmlp_s", 50_303_752), ("msmlp_b", 88_696_792)])
def test_param_counts_equal_official(name, count):
    # counts of the official MS_MLP built with each yaml config's kwargs
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_pretrained_cfgs_complete():
    names = timm.list_pretrained("msmlp_*")
    assert sorted(names) == ["msmlp_b.in1k", "msmlp_s.in1k", "msmlp_t.in1k"]
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["url"].endswith("_ckpt_epoch299.pth") and cfg["license"] == "mit", name
        assert cfg["paper_ids"] == "arXiv:2202.06510" and cfg["origin_url"] == "https://github.com/JegZheng/MS-MLP"
        assert (cfg["input_size"], cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"]) == \
            ((3, 224, 224), 0.875, "center", "bicubic"), name


def test_no_overwriting_warning_on_import():
    code = ("import warnings; warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import backbones.msmlp\n"
            "bad = [str(x.message) for x in w if 'Overwriting msmlp' in str(x.message)]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- timm contract ------------------------------------------------------------------------------------------------
def test_timm_contract():
    model = timm.create_model("msmlp_t", **TINY).eval()
    x = torch.randn(2, 3, 64, 96)  # a second, non-square resolution
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 80, 2, 3)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 80)
        assert model(x).shape == (2, 10)
        final, inter = model.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in inter] == [(10, 16, 24), (20, 8, 12), (40, 4, 6), (80, 2, 3)]
        torch.testing.assert_close(final, feats)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert len(early) == 1
        torch.testing.assert_close(early[0], inter[1])
        # a size that is not a multiple of 32 works (strided convs floor, as in ConvNeXt)
        assert model(torch.randn(1, 3, 70, 100)).shape == (1, 10)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 80)
    fm = timm.create_model("msmlp_t", features_only=True, out_indices=(1, 3), **TINY).eval()
    assert fm.feature_info.channels() == [20, 80] and fm.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        got = fm(x)
    assert [tuple(t.shape) for t in got] == [(2, 20, 8, 12), (2, 80, 2, 3)]
    pruned = timm.create_model("msmlp_t", **TINY).eval()
    assert pruned.prune_intermediate_layers(indices=(1,)) == [1]
    assert len(pruned.stages) == 2 and pruned.num_features == 20
    assert pruned.forward_intermediates(x, indices=[1], intermediates_only=True)[0].shape == (2, 20, 8, 12)
    one = timm.create_model("msmlp_t", in_chans=1, **TINY)
    assert one(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    # layer-decay groups: stem, one per block (a stage's downsample joins its first block), then the head
    groups = group_parameters(model, model.group_matcher())
    assert [v[0] for v in groups.values()] == ["stem.0.weight", "stages.0.blocks.0.gamma",
                                               "stages.1.downsample.0.weight", "stages.2.downsample.0.weight",
                                               "stages.3.downsample.0.weight", "head.norm.weight"]


def test_features_only_matches_forward_intermediates():
    torch.manual_seed(0)
    model = timm.create_model("msmlp_t", **TINY).eval()
    fm = timm.create_model("msmlp_t", features_only=True, **TINY).eval()
    fm.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("head.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(fm(x), model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b)


def test_grad_checkpointing_same_output_and_grads_and_recomputes():
    torch.manual_seed(0)
    model = timm.create_model("msmlp_t", drop_path_rate=0.1, **TINY).train()
    block, calls = model.stages[2].blocks[0], []
    block_forward = block.forward
    block.forward = lambda x: calls.append(1) or block_forward(x)  # counts runs (hooks do not fire on recompute)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    assert len(calls) == 1
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    assert len(calls) == 3  # forward once more, then recomputed in backward
    torch.testing.assert_close(out_ckpt, out)
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_train_step_all_parameters_get_gradients():
    model = timm.create_model("msmlp_t", drop_rate=0.1, drop_path_rate=0.2, **TINY).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    model = timm.create_model("msmlp_t", **TINY).eval()
    with pytest.raises(ValueError, match="in_chans=3 but the input has 4 channels"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="10 channels in chunks of 2 give 5 groups, not 6"):
        timm.create_model("msmlp_t", embed_dim=10, shift_dist=(-3, -2, -1, 1, 2, 3), mix_size=[(1,) * 6] * 4)
    with pytest.raises(ValueError, match="8 channels in chunks of 2 give 4 groups, not 5"):
        timm.create_model("msmlp_t", embed_dim=8, depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="mix_size has 3 entries"):
        timm.create_model("msmlp_t", mix_size=((1, 1, 3, 5, 7),) * 3)


def test_bad_checkpoint_errors():
    weights, io, kwargs = _fixture()
    model = timm.create_model("msmlp_t", **kwargs)
    missing = {k: v for k, v in weights.items() if "dwconv_td" not in k}
    with pytest.raises(ValueError, match=r"missing key\(s\): stages\.0\.blocks\.0\.mixer\.td\.0\.weight"):
        msmlp.checkpoint_filter_fn({"model": missing}, model)
    bad = dict(weights)
    bad["layers.0.downsample.proj.weight"] = torch.zeros(18, 9, 4, 4)
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\): stages\.1\.downsample\.0\.weight"):
        msmlp.checkpoint_filter_fn(bad, model)
