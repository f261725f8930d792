"""FFNet: parity with the official implementation, the timm contract, re-parameterisation, bad input."""
import copy

import pytest
import timm
import torch

import backbones.ffnet as ffnet
from parity_utils import assert_rel_close, load_fixture, second_sample

FIXTURES = ["ffnet_tiny_cfg", "ffnet_tiny_nols_cfg", "ffnet_tiny_fused_cfg", "ffnet_tiny_nols_fused_cfg"]
# a small FFNet for behaviour tests (all block kinds: RepVGG 7x7 and plain dw convs, SE, layer scale)
TINY = dict(embed_dim=(8, 16, 32, 64), in_dim=8, depth=(2, 1, 1, 1), kernel_sizes=(3, 7, 3, 7),
            kernel_sizes1=(3, 7, 3, 7), kernel_sizes2=(7, 3, 7, 3), use_ses=(True, False, True, False),
            use_layer_scale=True, num_classes=10)


def _fixture_model(name, **extra):
    weights, io, meta = load_fixture("ffnet", name)
    kwargs = {k: v for k, v in meta["kwargs"].items() if k != "drop_path_rate"}
    return weights, io, meta, kwargs


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", FIXTURES)
def test_parity_with_official(name, tmp_path):
    weights, io, meta, kwargs = _fixture_model(name)
    fused = "fused" in name
    model = timm.create_model("ffnet_t", fused=fused, **kwargs)
    model.load_state_dict(ffnet.checkpoint_filter_fn(weights, model))
    model = model.double().eval()
    x = io["input"].double()
    with torch.no_grad():
        assert_rel_close(model(x), io["logits"], 1e-6, "logits")
        assert_rel_close(model(second_sample(x))[:1], io["logits"], 1e-6, "logits, row 0 of a batch of 2")
        # stage maps through timm's features_only wrapper, weights loaded the way a download is
        path = tmp_path / "official.pth"
        torch.save({"model": weights}, path)
        feats = timm.create_model("ffnet_t", fused=fused, features_only=True, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **kwargs)
        maps = feats.double().eval()(x)
        assert len(maps) == 4
        for i, f in enumerate(maps):
            assert_rel_close(f, io[f"stage{i}"], 1e-5, f"stage{i}")


@pytest.mark.parametrize("name", ["ffnet_tiny_cfg", "ffnet_tiny_nols_cfg"])
def test_fused_checkpoint_into_training_form_fuses(name):
    weights, io, meta, kwargs = _fixture_model(name.replace("_cfg", "_fused_cfg"))
    model = timm.create_model("ffnet_t", **kwargs)
    assert not model.is_fused
    model.load_state_dict(ffnet.checkpoint_filter_fn({"state_dict": weights}, model))
    assert model.is_fused
    with torch.no_grad():
        assert_rel_close(model.double().eval()(io["input"].double()), io["logits"], 1e-6, "logits")


def test_pretrained_file_goes_through_timm_loader(tmp_path):
    """An official-format file (nested under 'model', as released) loads through timm's pretrained machinery."""
    weights, io, meta, kwargs = _fixture_model("ffnet_tiny_cfg")
    path = tmp_path / "ffnet_1.pth.tar"
    torch.save({"model": weights, "epoch": 300}, path)
    model = timm.create_model("ffnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              **kwargs)
    with torch.no_grad():
        assert_rel_close(model.double().eval()(io["input"].double()), io["logits"], 1e-6, "logits")


def test_fuse_matches_unfused():
    model = _randomize_bn(timm.create_model("ffnet_t", **TINY)).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
        fused = copy.deepcopy(model).fuse()
        assert fused.is_fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.stages.modules())
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4)
        # the fused state_dict loads into a model built fused
        direct = timm.create_model("ffnet_t", fused=True, **TINY).eval()
        direct.load_state_dict(fused.state_dict())
        torch.testing.assert_close(direct(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,count", [("ffnet_t", 13_775_656), ("ffnet_s", 27_208_408),
                                        ("ffnet_b", 48_817_896), ("ffnet_l", 79_868_968)])
def test_param_counts_equal_official(name, count):
    # counts of the official models/ffnet.py FFNet with the registered ffnet_1..4 arguments
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_official_names_resolve():
    with pytest.warns(UserWarning, match="deprecated"):
        model = timm.create_model("ffnet_1", num_classes=0)
    assert model.pretrained_cfg["architecture"] == "ffnet_t"
    assert sum(p.numel() for p in model.parameters()) == 13_775_656 - (640 * 1000 + 1000)


def test_pretrained_cfgs_complete():
    for name in timm.list_pretrained("ffnet_*"):
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["url"].startswith("https://github.com/ysj9909/FFNet/releases/"), name
        assert cfg["license"] and cfg["paper_ids"] == "arXiv:2406.02021" and cfg["interpolation"] == "bicubic"
        if name.endswith("_384"):  # the fine-tunes: evaluated uncropped (official train.py under --finetune)
            assert cfg["crop_pct"] == 1.0 and cfg["input_size"] == (3, 384, 384), name
        else:
            assert cfg["crop_pct"] == (0.9 if name.split(".")[0] in ("ffnet_t", "ffnet_s") else 0.95), name
    assert {n for n in timm.list_pretrained("ffnet_*") if n.endswith("_384")} == {"ffnet_b.in1k_384", "ffnet_l.in1k_384"}


def test_timm_contract():
    model = timm.create_model("ffnet_t", **TINY).eval()
    x = torch.randn(2, 3, 96, 64)  # non-square, a second resolution
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, 3, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
        assert model(x).shape == (2, 10)
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [8, 16, 32, 64]
        assert [t.shape[-1] for t in inter] == [16, 8, 4, 2]
        torch.testing.assert_close(final, feats)
        assert len(model.forward_intermediates(x, indices=[1], intermediates_only=True)) == 1
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    fm = timm.create_model("ffnet_t", features_only=True, out_indices=(1, 3), **TINY)
    assert fm.feature_info.channels() == [16, 64] and fm.feature_info.reduction() == [8, 32]
    assert [t.shape[1] for t in fm(x)] == [16, 64]
    one = timm.create_model("ffnet_t", in_chans=1, **TINY)
    assert one(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = timm.create_model("ffnet_t", **TINY).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    model(x).sum().backward()
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_bad_input_errors():
    model = timm.create_model("ffnet_t", **TINY).eval()
    with pytest.raises(ValueError, match="in_chans=3 but the input has 4 channels"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="4-D image batch"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("ffnet_xxl")


def test_bad_checkpoint_errors(tmp_path):
    weights, io, meta, kwargs = _fixture_model("ffnet_tiny_cfg")
    model = timm.create_model("ffnet_t", **kwargs)
    missing = {k: v for k, v in weights.items() if "channel_mixer" not in k}
    with pytest.raises(ValueError, match=r"missing key\(s\): stages\.0\.blocks\.0\.channel_mixer"):
        ffnet.checkpoint_filter_fn(missing, model)
    bad = dict(weights)
    bad["stages.1.1.token_mixer.0.main.fc.c.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\): stages\.1\.blocks\.0\.token_mixer\.fc\.c\.weight"):
        ffnet.checkpoint_filter_fn(bad, model)
    with pytest.raises(ValueError, match="built fused"):
        ffnet.checkpoint_filter_fn(weights, timm.create_model("ffnet_t", fused=True, **kwargs))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        timm.create_model("ffnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(corrupt)))
