"""OverLoCK: NATTEN-0.17 neighbourhood ops, parity with the official code (fixtures), re-parameterisation, timm API."""
import itertools

import pytest
import timm
import torch
from timm.models._manipulate import group_parameters

import backbones.overlock as overlock
from ops.na2d import na2d_av, na2d_qk, na2d_rpb, window_start
from parity_utils import assert_rel_close, load_fixture, second_sample

FIXTURES = ["overlock_tinycfg_r224x256", "overlock_tinycfg_r224x256_reparam", "overlock_tinycfg_r96x64",
            "overlock_tinycfg_resscale0_nods_r64x96"]
NAMES = ["overlock_xt", "overlock_t", "overlock_s", "overlock_b"]
NAMES += [n + "_reparam" for n in NAMES]
# small config for behaviour tests: 64x64 input -> 4x4 and 2x2 Focus-Net maps (the up-size path)
TINY = dict(depth=(1, 1, 1, 1), sub_depth=(2, 2), embed_dim=(8, 8, 16, 16), kernel_size=(5, 5, 7, 5),
            sub_num_heads=(1, 2), sub_mlp_ratio=(3, 3), projection=16, num_classes=10)


def fixture_model(name):
    sd, io, meta = load_fixture("overlock", name)
    kwargs = {k: v for k, v in meta["kwargs"].items() if k != "use_gemm"}  # use_gemm: optional CUDA kernel only
    model = overlock.OverLoCK(**kwargs).double()
    model.load_state_dict(overlock.checkpoint_filter_fn(sd, model))
    return model.eval(), sd, io, kwargs


# ---- ops/na2d: NATTEN 0.17 window / bias rules -----------------------------------------------------------------
def natten_window_start(i, length, k, d):
    """NATTEN 0.17 get_window_start (non-causal), transcribed as the piecewise C rule."""
    nb = k // 2
    if d <= 1:
        return max(i - nb, 0) + (i + nb >= length) * (length - i - nb - 1)
    if i - nb * d < 0:
        return i % d
    if i + nb * d >= length:
        imodd, a = i % d, (length // d) * d
        b = length - a
        return length - b + imodd - 2 * nb * d if imodd < b else a + imodd - k * d
    return i - nb * d


def natten_pb_start(i, length, k, d):
    """NATTEN 0.17 get_pb_start."""
    nb = k // 2
    if d <= 1:
        return nb + (i < nb) * (nb - i) + (i + nb >= length) * (length - i - 1 - nb)
    if i - nb * d < 0:
        return k - 1 - i // d
    if i + nb * d >= length:
        return (length - i - 1) // d
    return nb


def semantics_window_start(i, length, k, d):
    """The definition in NATTEN_na2d_semantics.md."""
    g, ip = i % d, i // d
    group_len = len(range(g, length, d))
    return min(max(ip - k // 2, 0), group_len - k) * d + g


AXES = [(9, 7, 1), (10, 3, 3), (7, 7, 1), (13, 5, 2), (11, 3, 3), (12, 3, 4), (17, 5, 3), (6, 3, 2), (15, 13, 1)]


@pytest.mark.parametrize("length,k,d", AXES)
def test_window_start_matches_natten(length, k, d):
    ours = window_start(length, k, d).tolist()
    assert ours == [semantics_window_start(i, length, k, d) for i in range(length)]
    assert ours == [natten_window_start(i, length, k, d) for i in range(length)]
    for i, s in enumerate(ours):  # exactly k taps, inside the image, in the pixel's dilation group
        taps = [s + a * d for a in range(k)]
        assert taps[0] >= 0 and taps[-1] < length and all(t % d == i % d for t in taps)


def test_window_start_semantics_examples():
    assert window_start(9, 7, 1).tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2]
    assert window_start(10, 3, 3).tolist() == [0, 1, 2, 0, 1, 2, 3, 1, 2, 3]


def brute_force(q, k_or_attn, v, k, d, rpb=None):
    """Loops straight from the definition: logits (q . key + bias) and the value aggregation with given attn."""
    B, G, H, W, _ = q.shape
    logits = torch.zeros(B, G, H, W, k * k, dtype=q.dtype)
    out = torch.zeros_like(v)
    for i, j in itertools.product(range(H), range(W)):
        si, sj = semantics_window_start(i, H, k, d), semantics_window_start(j, W, k, d)
        pi, pj = natten_pb_start(i, H, k, d), natten_pb_start(j, W, k, d)
        for a, c in itertools.product(range(k), range(k)):
            ni, nj = si + a * d, sj + c * d
            logits[:, :, i, j, a * k + c] = (q[:, :, i, j] * k_or_attn[:, :, ni, nj]).sum(-1)
            if rpb is not None:
                logits[:, :, i, j, a * k + c] += rpb[:, pi + a, pj + c]
    attn = logits.softmax(-1)
    for i, j in itertools.product(range(H), range(W)):
        si, sj = semantics_window_start(i, H, k, d), semantics_window_start(j, W, k, d)
        for a, c in itertools.product(range(k), range(k)):
            out[:, :, i, j] += attn[:, :, i, j, a * k + c, None] * v[:, :, si + a * d, sj + c * d]
    return logits, attn, out


@pytest.mark.parametrize("H,W,k,d", [(7, 9, 3, 2), (5, 6, 5, 1), (10, 9, 3, 3), (9, 5, 3, 1)])
def test_na2d_qk_av_match_brute_force(H, W, k, d):
    g = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(2, 2, H, W, 3, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 2 * k - 1, 2 * k - 1, generator=g, dtype=torch.float64)
    logits, attn, out = brute_force(q, key, v, k, d, rpb)
    torch.testing.assert_close(na2d_qk(q, key, k, d, rpb=rpb), logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(na2d_av(attn, v, k, d), out, rtol=1e-12, atol=1e-12)
    assert na2d_rpb(rpb, H, W, k, d).shape == (2, H, W, k * k)


def test_na2d_needs_window_inside_map():
    # the official model up-sizes such maps before calling na2d_av (covered by the *_r96x64 / *_r64x96 fixtures)
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        na2d_av(torch.zeros(1, 1, 5, 8, 9), torch.zeros(1, 1, 5, 8, 4), 3, dilation=2)


# ---- registry and parameter counts -----------------------------------------------------------------------------
def test_registered_without_overwriting_timm():
    for name in NAMES:
        assert timm.models.is_model(name)
        assert timm.models.model_entrypoint(name).__module__ == "backbones.overlock"
        assert timm.models.get_pretrained_cfg(name).url.endswith(".pth")


@pytest.mark.parametrize("name,count", [("overlock_xt", 17_307_272), ("overlock_xt_reparam", 16_791_384)])
def test_param_count(name, count):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


# ---- parity with the official code -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURES)
def test_parity(name):
    model, _, io, kwargs = fixture_model(name)
    x = second_sample(io["input"].double())  # row 1 is another sample: row 0 must not change
    ctx = []  # the Overview-Net output, to check the (training-only) aux head's weights
    model.blocks4[-1].register_forward_hook(lambda m, i, o: ctx.append(o))
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        logits = model.forward_head(final)
        aux = model.aux_head(ctx[0][:1]) if kwargs["use_ds"] else None
    assert_rel_close(logits[:1], io["logits"], 1e-6, "logits")
    for i, s in enumerate(stages):
        assert_rel_close(s[:1], io[f"stage{i}"], 1e-5, f"stage{i}")
    if aux is not None:
        assert_rel_close(aux, io["aux_logits"], 1e-5, "aux_logits")
    assert model(x).shape == (2, kwargs["num_classes"])  # eval mode: main logits only


def test_reparameterize_equals_official_reparam():
    model, _, _, _ = fixture_model("overlock_tinycfg_r224x256")
    x = torch.randn(2, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.reparameterize()
        after = model(x)
    assert_rel_close(after, before, 1e-10, "logits after reparameterize")
    reparam_sd, _, _ = load_fixture("overlock", "overlock_tinycfg_r224x256_reparam")
    official = overlock.checkpoint_filter_fn(reparam_sd, model)
    ours = model.state_dict()
    assert ours.keys() == official.keys()
    for k, v in official.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("name,variant,nest", [
    ("overlock_tinycfg_r96x64", "overlock_xt", lambda sd: {"model": sd}),
    ("overlock_tinycfg_resscale0_nods_r64x96", "overlock_t",
     lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 300}),
])
def test_pretrained_loads_official_file(tmp_path, name, variant, nest):
    sd, io, meta = load_fixture("overlock", name)
    path = tmp_path / "official.pth"
    torch.save(nest(sd), path)
    kwargs = {k: v for k, v in meta["kwargs"].items() if k != "use_gemm"}
    torch.set_default_dtype(torch.float64)  # load the float64 weights into a float64 model without rounding
    try:
        model = timm.create_model(variant, pretrained=True, **kwargs,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=kwargs["num_classes"]))
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        assert_rel_close(model.eval()(io["input"].double()), io["logits"], 1e-6, "logits")


def test_checkpoint_errors():
    model = overlock.OverLoCK(**TINY)
    sd = dict(model.state_dict())
    missing = {k: v for k, v in sd.items() if not k.startswith("sub_blocks4.1.")}
    with pytest.raises(ValueError, match="missing key.*sub_blocks4.1"):
        overlock.checkpoint_filter_fn(missing, model)
    sd["blocks1.0.dwconv.weight"] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(ValueError, match="mis-shaped.*blocks1.0.dwconv.weight"):
        overlock.checkpoint_filter_fn(sd, model)
    deploy = overlock.OverLoCK(**TINY, deploy=True)  # training-form weights do not fit the deploy form
    with pytest.raises(ValueError, match="unexpected key.*dil_conv"):
        overlock.checkpoint_filter_fn(model.state_dict(), deploy)
    no_aux = overlock.OverLoCK(**TINY, use_ds=False)  # the training-only aux head is dropped
    no_aux.load_state_dict(overlock.checkpoint_filter_fn(model.state_dict(), no_aux))
    headless = overlock.OverLoCK(**dict(TINY, num_classes=0))  # and the classifiers of a headless model
    headless.load_state_dict(overlock.checkpoint_filter_fn(model.state_dict(), headless))


# ---- behaviour (tiny config) -----------------------------------------------------------------------------------
def test_input_errors_and_any_size():
    model = overlock.OverLoCK(**TINY).eval()
    with pytest.raises(ValueError, match="in_chans=3 but the input has 1 channels"):
        model(torch.randn(1, 1, 64, 64))
    with torch.no_grad():  # any size works: small Focus-Net maps are up-sized for the dynamic kernels
        for h, w in [(33, 47), (64, 64), (160, 96), (1, 1)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 10)


def test_aux_logits_are_opt_in():
    torch.manual_seed(0)
    model = overlock.OverLoCK(**TINY, drop_path_rate=0.2, drop_rate=0.1)
    assert model.aux_loss_weight == 0.4
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)  # plain logits by default, as timm's models (and its train.py) expect
    assert torch.is_tensor(out) and out.shape == (2, 10)
    model.set_aux_training(True)  # deep supervision, as timm's distilled models switch theirs on
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 10)
    target = torch.tensor([1, 2])
    loss = torch.nn.functional.cross_entropy(logits, target)
    loss = loss + model.aux_loss_weight * torch.nn.functional.cross_entropy(aux, target)
    loss.backward()
    assert model.aux_head.fc.weight.grad.abs().sum() > 0 and model.patch_embed1[0].weight.grad.abs().sum() > 0
    assert torch.is_tensor(model.eval()(torch.randn(1, 3, 64, 64)))  # never in eval mode
    no_aux = overlock.OverLoCK(**TINY, use_ds=False).train()
    no_aux.set_aux_training(True)
    assert torch.is_tensor(no_aux(x))


def test_grad_checkpointing_same_output_and_grads(monkeypatch):
    torch.manual_seed(0)
    model = overlock.OverLoCK(**TINY, use_ds=False).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    calls = []
    monkeypatch.setattr(overlock, "checkpoint", lambda *a, _ckpt=overlock.checkpoint: calls.append(1) or _ckpt(*a))
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    assert len(calls) == 8  # every block
    torch.testing.assert_close(out_ckpt, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_head_api():
    model = overlock.OverLoCK(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2) and model.num_features == 20
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model.get_classifier() is model.head.fc
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.aux_head.fc.out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 16)
    model.reset_classifier(3, "max")
    assert model(x).shape == (2, 3)
    m1 = timm.create_model("overlock_xt", **dict(TINY, in_chans=1, num_classes=0)).eval()
    assert m1(torch.randn(1, 1, 64, 64)).shape == (1, 16)


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    model = overlock.OverLoCK(**TINY).eval()
    feat = timm.create_model("overlock_xt", features_only=True, **TINY).eval()
    assert feat.feature_info.channels() == [8, 8, 20, 20] and feat.feature_info.reduction() == [4, 8, 16, 32]
    feat.model.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        maps = feat(x)
        early = model.forward_intermediates(x, indices=[0, 2], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
    for m, ref in zip(maps, inter):
        torch.testing.assert_close(m, ref)
    torch.testing.assert_close(early[1], inter[2])
    assert [m.shape[-2:] for m in maps] == [(24, 16), (12, 8), (6, 4), (3, 2)]
    two = timm.create_model("overlock_xt", features_only=True, out_indices=(0, 1), **TINY)
    assert len(two.model.blocks3) == 0 and len(two(x)) == 2  # later stages pruned


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_pruned_model_forward_features_ends_at_the_tap(index):
    model = overlock.OverLoCK(**TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tap = model.forward_intermediates(x, indices=[index], intermediates_only=True)[0]
        model.prune_intermediate_layers([index])
        torch.testing.assert_close(model.forward_features(x), tap, rtol=0, atol=0)
        torch.testing.assert_close(model(x), tap, rtol=0, atol=0)  # no head left: the map itself
    assert model.num_features == model.head_hidden_size == tap.shape[1]
    model.train().forward_features(x).sum().backward()


def test_group_matcher_covers_all_params_in_order():
    model = overlock.OverLoCK(**TINY)
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        names = list(itertools.chain.from_iterable(groups.values()))
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        order = [next(g for g, ns in groups.items() if any(n.startswith(p) for n in ns))
                 for p in ("patch_embed1.", "blocks4.", "sub_blocks3.", "sub_blocks4.", "head.")]
        assert order == sorted(order)


def test_no_name_clash_with_timm():
    # registering a name another module (timm's own) already registered is what triggers "Overwriting ..."
    for module, names in timm.models._registry._module_to_models.items():
        if module != "overlock":
            assert not set(names) & set(NAMES), module
