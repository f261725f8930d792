"""Spikformer: the LIF op, parity with the official code (ImageNet, CIFAR-10, CIFAR10-DVS fixtures), timm contract."""
import sys

import pytest
import timm
import torch

import backbones.spikformer as spikformer
from ops.lif import lif_multistep, lif_multistep_reference
from tests.parity_utils import assert_rel_close, load_fixture, second_sample

# fixture name -> (hub model whose code path it exercises, tiny-config kwargs, official layout of its token maps)
FIXTURES = {
    "spikformer_imagenet_tinycfg_r64": ("spikformer_8_512", dict(embed_dim=32, num_heads=2, depth=2), "TBCHW"),
    "spikformer_cifar10_tinycfg_r16": ("spikformer_cifar_4_384", dict(embed_dim=32, num_heads=2, depth=2), "TBNC"),
    "spikformer_cifar10dvs_tinycfg_r128_T4": ("spikformer_dvs_2_256", dict(embed_dim=16, num_heads=2, depth=2),
                                              "TBCN"),
}
TINY = dict(embed_dim=16, num_heads=2, depth=2, num_classes=5)


def _official_to_ours(t: torch.Tensor, layout: str, like: torch.Tensor) -> torch.Tensor:
    """Official (T, B, ...) token maps -> our (T, B, C, H, W)."""
    if layout == "TBNC":
        t = t.transpose(-1, -2)
    return t.double().reshape(like.shape)


# ---- the LIF op ------------------------------------------------------------------------------------------------
def test_lif_recurrence_hard_reset_and_ties():
    # tau=2: h = v + (x - v)/2; fire if h >= 1 (ties fire); v -> 0 after a spike
    x = torch.tensor([[1.0, 2.0], [1.0, 0.5], [1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    # column 0: h = .5, .75, .875, .4375 -> no spikes; column 1: h = 1 (tie: fires), .25, 1.125, .0 -> 1,0,1,0
    s = lif_multistep_reference(x)
    assert s.tolist() == [[0.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    assert lif_multistep_reference(x, v_threshold=0.875)[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_lif_soft_reset_and_no_decay_input():
    x = torch.tensor([[3.0], [0.0]])
    # soft reset: h0 = 1.5 -> spike, v = 0.5; h1 = 0.25 -> none
    assert lif_multistep_reference(x, v_reset=None).flatten().tolist() == [1.0, 0.0]
    # no decay_input: h0 = 3 -> spike, v = 0; with soft reset v = 2, h1 = 1 -> spike
    assert lif_multistep_reference(x, decay_input=False).flatten().tolist() == [1.0, 0.0]
    assert lif_multistep_reference(x, decay_input=False, v_reset=None).flatten().tolist() == [1.0, 1.0]


def test_lif_surrogate_gradient_and_detach_reset():
    x = torch.tensor([[0.9], [0.0]], dtype=torch.float64, requires_grad=True)
    s = lif_multistep_reference(x, alpha=4.0)
    s[0].sum().backward()
    z = torch.tensor(0.45 - 1.0, dtype=torch.float64)  # h0 = 0.45
    sg = torch.sigmoid(4.0 * z)
    assert torch.allclose(x.grad[0], 4.0 * sg * (1 - sg) * 0.5)  # dH/dz * dh/dx, dh/dx = 1/tau
    # reset path: spike at t=0 then reset; with detach_reset the reset carries no gradient through the spike
    y = torch.tensor([[2.0], [0.0]], dtype=torch.float64, requires_grad=True)
    grads = []
    for detach in (True, False):
        y.grad = None
        lif_multistep_reference(y, detach_reset=detach)[1].sum().backward()
        grads.append(y.grad[0].item())
    assert grads[0] != grads[1]


def test_lif_dispatcher():
    x = torch.randn(3, 2, 5)
    assert torch.equal(lif_multistep(x, impl="reference"), lif_multistep_reference(x))
    with pytest.raises(ValueError, match="Triton kernel does not support"):
        lif_multistep(x.double(), impl="triton")  # float64 is reference-only


# ---- registration and sizes ------------------------------------------------------------------------------------
def test_names_do_not_shadow_timm_models():
    # an "Overwriting ... in registry" warning at import could only come from a name timm itself defines
    ours = set(timm.list_models("spikformer*"))
    assert ours == set(PARAMS)
    timm_modules = [m for n, m in sys.modules.items() if n.startswith("timm.models.")]
    assert not [n for n in ours for m in timm_modules if hasattr(m, n)]


PARAMS = {
    # official code's count for 8-512 is 29,705,768: it also counts the never-used Block.norm1/norm2 LayerNorms
    # (8 blocks x 2 x (512 + 512) = 16,384), which we do not build (see checkpoint_filter_fn)
    "spikformer_8_512": 29_705_768 - 8 * 2 * 2 * 512,
    # paper (truncated to 0.01M): 16.81M, 23.37M, 36.01M, 66.34M; CIFAR 4.15M, 5.76M, 9.32M; DVS 2.57M
    "spikformer_8_384": 16_816_024, "spikformer_6_512": 23_373_352, "spikformer_10_512": 36_005_416,
    "spikformer_8_768": 66_338_632, "spikformer_cifar_4_256": 4_155_178, "spikformer_cifar_2_384": 5_765_050,
    "spikformer_cifar_4_384": 9_324_730, "spikformer_dvs_2_256": 2_566_666,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


# ---- parity with the official code -----------------------------------------------------------------------------
def _parity_model(name: str):
    arch, kw, _ = FIXTURES[name]
    weights, io, meta = load_fixture("spikformer", name)
    model = timm.create_model(arch, num_classes=meta["kwargs"]["num_classes"], T=meta["extra"]["T"], **kw)
    return model.double().eval(), weights, io


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_parity(name):
    model, weights, io = _parity_model(name)
    model.load_state_dict(spikformer.checkpoint_filter_fn(weights, model))
    layout = FIXTURES[name][2]
    x = io["input"].double()
    with torch.no_grad():
        assert_rel_close(model(x), io["logits"], 1e-6, "logits")
        assert_rel_close(model(second_sample(x))[:1], io["logits"], 1e-6, "logits, row 0 of a batch of 2")
        seq = model._to_sequence(x)
        stem = model.patch_embed(seq)
        assert_rel_close(stem, _official_to_ours(io["patch_embed"], layout, stem), 1e-5, "SPS output (per step)")
        per_step = model.forward_features(x, per_step=True)
        assert_rel_close(per_step, _official_to_ours(io["block1"], layout, per_step), 1e-5, "last block (per step)")
        assert_rel_close(model.forward_head(per_step.mean(0), pre_logits=True), io["pre_logits"], 1e-5, "pre_logits")

    feat = timm.create_model(FIXTURES[name][0], features_only=True, out_indices=(0, 1), **FIXTURES[name][1])
    feat = feat.double().eval()
    feat.model.load_state_dict({k: v for k, v in spikformer.checkpoint_filter_fn(weights, model).items()
                                if not k.startswith("head.")})
    with torch.no_grad():
        maps = feat(x)
    for i, m in enumerate(maps):
        ref = _official_to_ours(io[f"block{i}"], layout, per_step).mean(0)
        assert_rel_close(m, ref, 1e-5, f"features_only map {i} (time-averaged)")


@pytest.mark.parametrize("name, nesting", [
    ("spikformer_imagenet_tinycfg_r64", "state_dict"),  # timm CheckpointSaver format of imagenet/cifar10 train.py
    ("spikformer_cifar10dvs_tinycfg_r128_T4", "model"),  # torchvision-style saver of cifar10dvs/train.py
])
def test_pretrained_official_file(name, nesting, tmp_path):
    arch, kw, _ = FIXTURES[name]
    weights, io, meta = load_fixture("spikformer", name)
    path = tmp_path / "official.pth"
    torch.save({"epoch": 1, nesting: {f"module.{k}": v for k, v in weights.items()}}, path)
    num_classes = meta["kwargs"]["num_classes"]  # tiny fixture head: tell timm the file has it (else it is dropped)
    overlay = dict(file=str(path), num_classes=num_classes)
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                              T=meta["extra"]["T"], **kw)
    # the same path a download takes: float32 parameters, so compare in float32 against the converted weights
    expected = spikformer.checkpoint_filter_fn(weights, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k].to(v.dtype)), k
    with torch.no_grad():
        logits = model.eval()(io["input"])
    assert_rel_close(logits, io["logits"], 1e-4, "logits with float32 weights")


# ---- errors ----------------------------------------------------------------------------------------------------
def test_bad_checkpoint_and_input():
    model, weights, _ = _parity_model("spikformer_imagenet_tinycfg_r64")
    missing = {k: v for k, v in weights.items() if not k.startswith("block.1.mlp.fc2_conv")}
    with pytest.raises(ValueError, match=r"missing key\(s\): blocks.1.mlp.fc2.conv.weight"):
        spikformer.checkpoint_filter_fn(missing, model)
    bad = dict(weights, **{"block.0.attn.q_conv.weight": torch.zeros(32, 16, 1)})
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\): blocks.0.attn.q.conv.weight"):
        spikformer.checkpoint_filter_fn(bad, model)
    with pytest.raises(ValueError, match="in_chans=3 but the input has 1 channels"):
        model(torch.zeros(1, 1, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"image batch \(B, C, H, W\) or a frame sequence"):
        model(torch.zeros(3, 64, 64, dtype=torch.float64))


# ---- timm contract on tiny models ------------------------------------------------------------------------------
def test_any_input_size_and_time_steps():
    model = timm.create_model("spikformer_8_512", T=3, **TINY).eval()
    with torch.no_grad():
        # not a multiple of 16 (the official reshapes need one): max-pools round up, 40x24 -> 3x2 tokens
        assert model.forward_features(torch.randn(2, 3, 40, 24)).shape == (2, 16, 3, 2)
        x = torch.randn(2, 3, 32, 32)
        per_step = model(x, per_step=True)
        assert per_step.shape == (3, 2, 5)
        assert torch.allclose(per_step.mean(0), model(x), atol=1e-6)
        # stateless neurons: a second call gives the same output (no reset_net needed)
        assert torch.equal(model(x), model(x))
        # a (B, T, C, H, W) sequence brings its own T; a repeated image equals the static input
        assert torch.allclose(model(x.unsqueeze(1).expand(2, 3, 3, 32, 32)), model(x))


def test_drop_path_drops_whole_samples():
    drop = spikformer.SequenceDropPath(0.5).train()
    torch.manual_seed(0)
    y = drop(torch.ones(3, 64, 2, 1, 1))  # (T, B, C, H, W)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert (y == y[:1]).all()  # the same samples are dropped at every time step


def test_features_only_and_intermediates():
    model = timm.create_model("spikformer_cifar_4_384", **TINY).eval()
    feat = timm.create_model("spikformer_cifar_4_384", features_only=True, **TINY).eval()
    feat.model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    assert feat.feature_info.channels() == [16, 16] and feat.feature_info.reduction() == [4, 4]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        maps = feat(x)
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert torch.equal(model.forward_intermediates(x, indices=[0], intermediates_only=True)[0], inter[0])
    assert [m.shape for m in maps] == [(2, 16, 4, 4)] * 2
    for a, b in zip(maps, inter):
        assert torch.equal(a, b)
    dvs = timm.create_model("spikformer_dvs_2_256", features_only=True, **TINY)
    assert dvs(torch.rand(1, 2, 2, 32, 32))[-1].shape == (1, 16, 2, 2)  # (B, T, 2, H, W) event frames


def test_train_step_grad_checkpointing_and_classifier():
    torch.manual_seed(0)
    model = timm.create_model("spikformer_8_512", in_chans=1, drop_path_rate=0.1, **TINY).train()
    x = torch.randn(2, 1, 32, 32)
    model.set_grad_checkpointing(False)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads["patch_embed.convs.0.conv.weight"].abs().sum() > 0  # the surrogate gradient reaches the stem
    model.zero_grad()
    model.set_grad_checkpointing(True)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    assert len(calls) == 2  # the block really was recomputed in backward
    assert torch.allclose(out, out_ckpt)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n

    assert model.get_classifier().out_features == 5
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, 16)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 16, 2, 2)
    with pytest.raises(ValueError, match="only works without a classifier"):
        model.reset_classifier(3, "")
    model.reset_classifier(3)  # a new classifier brings the default pooling back
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", timm.list_models("spikformer_*", include_tags=True))
def test_input_channels_match_the_pretrained_cfg(name):
    # the DVS model reads 2 event polarities: its cfg, its in_chans and its first conv must all agree
    model = timm.create_model(name, device="meta")
    cfg_chans = model.pretrained_cfg["input_size"][0]
    assert model.in_chans == cfg_chans == model.patch_embed.convs[0].conv.in_channels
    assert cfg_chans == (2 if name.startswith("spikformer_dvs") else 3)
