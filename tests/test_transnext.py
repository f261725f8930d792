"""TransNeXt: parity with the official implementation (incl. its resolution semantics), any input size at forward
time, the aggregated-attention op's definition, the timm contract, bad input."""
import pytest
import timm
import torch
import torch.nn.functional as F

import backbones.transnext as transnext
from ops.aggregated_attention import aggregated_attention, aggregated_attention_reference
from parity_utils import assert_rel_close, load_fixture, second_sample

FIXTURES = ["transnext_tinycfg_r128", "transnext_aaaa_tinycfg_r128", "transnext_tinycfg_r128_at160",
            "transnext_tinycfg_r128_at160_fixedpool3"]
# small TransNeXt for behaviour tests: aggregated attention in stages 1-3, full attention in stage 4
TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 4, 4), depths=(2, 1, 1, 1), num_classes=10, img_size=64)


def _kwargs(meta, **override):
    """Our constructor kwargs for a fixture (the official ones minus those that are constants or renamed)."""
    kw = {k: v for k, v in meta["kwargs"].items() if k not in ("norm_layer", "num_stages", "drop_rate")}
    kw["window_size"] = tuple(kw["window_size"])
    return dict(kw, **override)


def _load(weights, **kwargs):
    model = transnext.TransNeXt(**kwargs)
    model.load_state_dict(transnext.checkpoint_filter_fn({"model": weights}, model))
    return model.double().eval()


@pytest.mark.parametrize("name", FIXTURES)
def test_parity_with_official(name, tmp_path):
    """Built with the official constructor kwargs (img_size / pretrain_size / fixed_pool_size) and run at img_size."""
    weights, io, meta = load_fixture("transnext", name)
    model = _load(weights, **_kwargs(meta))
    x = io["input"].double()
    with torch.no_grad():
        features = model.forward_features(x)
        assert_rel_close(model.forward_head(features), io["logits"], 1e-6, "logits")
        assert_rel_close(model.forward_head(features, pre_logits=True), io["pre_logits"], 1e-5, "pre_logits")
        assert_rel_close(model(second_sample(x))[:1], io["logits"], 1e-6, "logits, row 0 of a batch of 2")
    # the resolution-dependent tables equal the official (non-persistent) buffers exactly
    for i, stage in enumerate(model.stages):
        index, table = stage.tables(tuple(io[f"stage{i}"].shape[-2:]), x.device)
        assert torch.equal(index, io[f"buffer.relative_pos_index{i + 1}"].reshape(-1))
        assert torch.equal(table, io[f"buffer.relative_coords_table{i + 1}"])
    # stage maps through timm's features_only wrapper, weights loaded the way a download is
    path = tmp_path / "official.pth"
    torch.save({"model": weights, "epoch": 299, "max_accuracy": 0.0}, path)  # as main.py saves it
    feats = timm.create_model("transnext_micro", features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **_kwargs(meta))
    with torch.no_grad():
        maps = feats.double().eval()(x)
    assert len(maps) == 4 and feats.feature_info.reduction() == [4, 8, 16, 32]
    for i, f in enumerate(maps):
        assert_rel_close(f, io[f"stage{i}"], 1e-5, f"stage{i}")


def test_window_mask_and_length_scale_match_official_buffers():
    _, io, _ = load_fixture("transnext", "transnext_aaaa_tinycfg_r128")
    from ops.aggregated_attention import window_valid_mask
    for key, grid, pool in [("block1.0", 32, 4), ("block4.0", 4, 4)]:  # pool grids are 2x2 in every stage
        valid = window_valid_mask((grid, grid), 3)
        assert torch.equal(~valid, io[f"buffer.{key}.attn.padding_mask"])
        scale = torch.log(valid.sum(-1, keepdim=True).float() + pool)  # the op's float32 length scale
        assert torch.equal(scale, io[f"buffer.{key}.attn.seq_length_scale"])


@pytest.mark.parametrize("fixed_pool_size", [None, 3])
def test_other_resolution_at_forward_time_without_rebuilding(fixed_pool_size):
    """One model built for 128 (pretrain_size 128) reproduces the official model REBUILT for 160 with
    pretrain_size=128 (multi-scale inference; with fixed_pool_size: linear inference mode), and still 128 after."""
    weights, io128, meta = load_fixture("transnext", "transnext_tinycfg_r128")
    name = "transnext_tinycfg_r128_at160" + ("_fixedpool3" if fixed_pool_size else "")
    _, io160, _ = load_fixture("transnext", name)
    model = _load(weights, **_kwargs(meta, fixed_pool_size=fixed_pool_size))
    with torch.no_grad():
        if fixed_pool_size is None:
            assert_rel_close(model(io128["input"].double()), io128["logits"], 1e-6, "logits at 128")
        assert_rel_close(model(io160["input"].double()), io160["logits"], 1e-6, "logits at 160")
        if fixed_pool_size is None:
            assert_rel_close(model(io128["input"].double()), io128["logits"], 1e-6, "logits at 128 again")
            assert len(model.stages[0].cpb_tables.cache) == 2  # one cached table set per size


def test_any_size_and_clear_errors():
    model = transnext.TransNeXt(**TINY).eval()
    assert model.min_input_size == 29  # stage 1: ceil(29 / 4) = 8 = its pooling ratio
    with torch.no_grad():
        assert model(torch.randn(1, 3, 29, 45)).shape == (1, 10)  # odd, non-square, not a multiple of 32
        with pytest.raises(ValueError, match="at least 29x29"):
            model(torch.randn(1, 3, 28, 64))
        with pytest.raises(ValueError, match="in_chans=3 but the input has 1 channels"):
            model(torch.randn(1, 1, 64, 64))
    # linear inference mode: every aggregated grid must exceed fixed_pool_size (official assert)
    fixed = transnext.TransNeXt(**dict(TINY, fixed_pool_size=3)).eval()
    assert fixed.min_input_size == 49  # stage 3 (stride 16) needs a 4x4 grid
    with torch.no_grad(), pytest.raises(ValueError, match="at least 49x49"):
        fixed(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="pretrain_size"):
        transnext.TransNeXt(**dict(TINY, pretrain_size=32))


def _naive_aggregated_attention(q, k, v, k_pool, v_pool, temp, qe, rpb, pool_bias, tokens, lbias, size, ws):
    """Per-pixel loops straight from the module docstring (independent of unfold's layout)."""
    B, nh, N, d = q.shape
    H, W = size
    out = torch.zeros_like(q)
    qn, kn, kpn = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(k_pool, dim=-1)
    for b in range(B):
        for h in range(nh):
            for i in range(H):
                for j in range(W):
                    n = i * W + j
                    nbrs = [((i + z // ws - ws // 2) * W + j + z % ws - ws // 2, z) for z in range(ws * ws)
                            if 0 <= i + z // ws - ws // 2 < H and 0 <= j + z % ws - ws // 2 < W]
                    scale = torch.log(torch.tensor(len(nbrs) + k_pool.shape[2], dtype=torch.float32)).double()
                    qs = (qn[b, h, n] + qe[h, 0]) * F.softplus(temp[h, 0, 0]) * scale
                    logits = [qs @ kn[b, h, m] + rpb[h, z] for m, z in nbrs]
                    logits += [qs @ kpn[b, h, p] + pool_bias[h, n, p] for p in range(k_pool.shape[2])]
                    w = torch.stack(logits).softmax(0)
                    for (m, z), wz in zip(nbrs, w):
                        out[b, h, n] += (wz + qn[b, h, n] @ tokens[h, :, z] + lbias[h, 0, z]) * v[b, h, m]
                    out[b, h, n] += w[len(nbrs):] @ v_pool[b, h]
    return out


def test_aggregated_attention_op_definition():
    g = torch.Generator().manual_seed(0)
    B, nh, d, size, P, ws = 2, 2, 3, (3, 5), 4, 3
    N = size[0] * size[1]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = (r(B, nh, N, d), r(B, nh, N, d), r(B, nh, N, d), r(B, nh, P, d), r(B, nh, P, d), r(nh, 1, 1),
            r(nh, 1, d), r(nh, ws * ws), r(nh, N, P), r(nh, d, ws * ws), r(nh, 1, ws * ws))
    expected = _naive_aggregated_attention(*args, size, ws)
    assert_rel_close(aggregated_attention_reference(*args, size, ws), expected, 1e-12, "reference vs loops")
    assert_rel_close(aggregated_attention(*args, size, ws, impl="reference"), expected, 1e-12, "dispatcher")
    with pytest.raises(ValueError, match="Triton kernel does not support"):
        aggregated_attention(*args, size, ws, impl="triton")


def test_registered_variants_and_param_counts():
    expected = {"transnext_micro": 12_809_304, "transnext_tiny": 28_258_960, "transnext_small": 49_741_564,
                "transnext_base": 89_721_496, "transnext_micro_aaaa": 13_114_008}  # = the official code's counts
    for name, count in expected.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == count, name
    aaaa = model
    assert all(isinstance(s.blocks[0].attn, transnext.AggregatedAttention) for s in aaaa.stages)
    assert aaaa.pretrain_size == 256
    with torch.device("meta"), pytest.warns(UserWarning, match="deprecated"):
        assert timm.create_model("transnext_micro_AAAA").pretrained_cfg["tag"] == "in1k"  # official name


def test_pretrained_cfgs():
    cfgs = {n: timm.get_pretrained_cfg(n) for n in timm.list_pretrained("transnext_*")}
    assert len(cfgs) == 7
    for name, cfg in cfgs.items():
        assert cfg.hf_hub_id.startswith("DaiShiResearch/") and cfg.hf_hub_filename.endswith(".pth"), name
        assert cfg.license == "apache-2.0" and cfg.paper_ids == "arXiv:2311.17132", name
        assert cfg.interpolation == "bicubic" and cfg.mean == (0.485, 0.456, 0.406), name
    # official eval: Resize(size / 0.875) + CenterCrop below 384, a bicubic warp (squash) at 384
    assert cfgs["transnext_small.in1k_384"].input_size == (3, 384, 384)
    assert (cfgs["transnext_base.in1k_384"].crop_pct, cfgs["transnext_base.in1k_384"].crop_mode) == (1.0, "squash")
    assert (cfgs["transnext_micro.in1k"].crop_pct, cfgs["transnext_micro.in1k"].crop_mode) == (0.875, "center")
    assert cfgs["transnext_micro_aaaa.in1k"].input_size == (3, 256, 256)
    # the 384 fine-tunes were evaluated with pretrain_size 224: the registered default
    with torch.device("meta"):
        assert timm.create_model("transnext_small").pretrain_size == 224


def test_checkpoint_errors_and_prefixes(tmp_path):
    weights, io, meta = load_fixture("transnext", "transnext_tinycfg_r128")
    model = transnext.TransNeXt(**_kwargs(meta))
    # DDP prefix, already-converted keys and the official geometry buffers are all accepted
    sd = transnext.checkpoint_filter_fn({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, model)
    assert transnext.checkpoint_filter_fn(dict(sd, relative_pos_index1=torch.zeros(3)), model).keys() == sd.keys()
    broken = dict(weights)
    del broken["block2.0.attn.learnable_tokens"]
    broken["block1.0.attn.q.weight"] = broken["block1.0.attn.q.weight"][:4]
    with pytest.raises(ValueError, match=r"missing key.*stages\.1\.blocks\.0\.attn\.learnable_tokens"
                                         r".*mis-shaped.*stages\.0\.blocks\.0\.attn\.q\.weight"):
        transnext.checkpoint_filter_fn({"model": broken}, model)
    path = tmp_path / "broken.pth"
    torch.save({"model": broken}, path)
    with pytest.raises(ValueError, match="learnable_tokens"):
        timm.create_model("transnext_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **_kwargs(meta))


def test_features_and_intermediates():
    model = timm.create_model("transnext_micro", **TINY).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape for t in inter] == [(2, c, -(-64 // r), -(-80 // r)) for c, r in
                                            zip((8, 16, 24, 32), (4, 8, 16, 32))]
        assert torch.equal(final, model.forward_features(x))
        assert torch.equal(model.forward_head(final), model(x))
        assert model.forward_head(final, pre_logits=True).shape == (2, 32)
        only = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert len(only) == 1 and torch.equal(only[0], inter[1])
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2 and model.num_features == 16 and isinstance(model.head, torch.nn.Identity)
    assert [f["module"] for f in transnext.TransNeXt(**TINY).feature_info] == [f"stages.{i}" for i in range(4)]
    feats = timm.create_model("transnext_micro", features_only=True, out_indices=(1, 3), **TINY)
    assert [f.shape[1] for f in feats(x)] == [16, 32]


def test_grad_checkpointing_recomputes_and_matches():
    torch.manual_seed(0)
    model = timm.create_model("transnext_micro", **TINY).train()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    model.stages[1].blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    n_before = len(calls)
    torch.manual_seed(1)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    assert len(calls) - n_before == 2  # the block ran again during backward
    assert torch.allclose(out, out_ckpt, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert p.grad is not None and torch.allclose(g, p.grad, atol=1e-5)


def test_train_step_head_and_in_chans():
    model = timm.create_model("transnext_micro", in_chans=1, drop_rate=0.1, drop_path_rate=0.2,
                              attn_drop_rate=0.1, proj_drop_rate=0.1, **TINY).train()
    out = model(torch.randn(2, 1, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None for p in model.parameters())
    assert model.stages[0].blocks[1].drop_path.drop_prob > 0
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(torch.randn(1, 1, 64, 64)).shape == (1, 5)
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 32, 2, 2)
    assert {"stages.0.blocks.0.attn.query_embedding", "stages.3.blocks.0.attn.cpb_fc1.weight",
            "stages.3.blocks.0.attn.temperature"} <= model.no_weight_decay()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
