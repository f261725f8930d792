"""OFQ (backbones/quant): quantizers vs hand-computed values, layer policy on the families, CGA, the oscillation
metric, the Lightning callback (fit, checkpoint, resume) and export of integer weights + scales."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import backbones  # noqa: F401  (registers every family)
from backbones.quant import (OFQ, LSQQuantizer, OscillationTracker, QuantConv2d, QuantLinear, StatsQ,
                             cga_free_mask, export_quantized, load_quantized, quantize_for_checkpoint,
                             quantize_model, quantized_layers)

NANO = dict(embed_dim=[16, 32, 64, 128], depth=[1, 1, 1, 1], in_dim=8)


def _ffnet(**kw):
    torch.manual_seed(0)
    return timm.create_model("ffnet_t", num_classes=10, **NANO, **kw)


# ---- quantizers ------------------------------------------------------------------------------------------------
def test_statsq_levels_and_integers():
    q = StatsQ(2)
    w = torch.tensor([[0.1, -0.3, 0.6, -0.2]])  # s = 0.6, levels s * (k + .5) / 2
    torch.testing.assert_close(q(w), torch.tensor([[0.15, -0.45, 0.45, -0.15]]))
    assert q.integers(w).tolist() == [[0.0, -2.0, 1.0, -1.0]]
    codes, scale = q.export(w)
    assert codes.dtype == torch.int8 and codes.tolist() == [[1, -3, 3, -1]]
    torch.testing.assert_close(scale[:, None] * codes.float(), q(w), rtol=0, atol=0)
    assert not list(q.parameters())


@pytest.mark.parametrize("bits,signed", [(4, True), (2, False)])
def test_lsq_official_init_and_grad_scale(bits, signed):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    x = x if signed else x.abs()
    q = LSQQuantizer(bits, 3, dim=1, signed=None)  # sign decided from the first batch (official image rule)
    x = x.requires_grad_()
    y = q(x)
    assert bool(q.initialized) and q.signed == signed
    qp = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    mean = x.detach().abs().transpose(0, 1).reshape(3, -1).mean(1)
    torch.testing.assert_close(q.step.detach(), (2 if signed else 4) * mean / math.sqrt(qp))
    # gradient of the step = grad_scale * sum(d y / d s); grad_scale = 1 / sqrt(Qp * B * H * W)
    y.sum().backward()
    v = x.detach() / q.step.detach().view(1, 3, 1, 1)
    qn = -(qp + 1) if signed else 0
    inside = (v > qn) & (v < qp)
    per_el = torch.where(inside, v.round() - v, v.clamp(qn, qp))
    expected = per_el.sum((0, 2, 3)) / math.sqrt(qp * 4 * 25)
    torch.testing.assert_close(q.step.grad, expected, rtol=1e-4, atol=1e-5)
    step = q.step.detach().clone()
    q(torch.randn(4, 3, 5, 5) * 100)  # initialised once only
    torch.testing.assert_close(q.step.detach(), step)


def test_lsq_weight_quantizer_official_per_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    q = LSQQuantizer(8, 6, dim=0, signed=True)  # the official LsqQuantizerWeight of head / patch embedding
    q(w)
    torch.testing.assert_close(q.step.detach(), 2 * w.abs().mean(1) / math.sqrt(127))
    assert q.grad_scale(w) == pytest.approx(1 / math.sqrt(127 * 10))


# ---- policy ----------------------------------------------------------------------------------------------------
def test_policy_on_ffnet_roles_bits_and_keys():
    m = _ffnet()
    keys = set(m.state_dict())
    roles = quantize_model(m, dict(wbits=2, abits=3))
    assert set(k for k, r in roles.items() if r == "edge") == {"stem.0.c", "head.fc"}
    n_conv_lin = sum(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules())
    assert len(roles) == n_conv_lin  # every conv (incl. depthwise) and linear
    layers = dict(quantized_layers(m))
    stem, head = layers["stem.0.c"], layers["head.fc"]
    assert isinstance(stem.wq, LSQQuantizer) and stem.wq.bits == 8 and stem.aq.bits == 8 and stem.aq.dim == 1
    assert head.aq.dim is None and head.aq.signed and isinstance(head, QuantLinear)
    blk = layers["stages.0.blocks.0.channel_mixer.fc2"]
    assert isinstance(blk.wq, StatsQ) and blk.wq.bits == 2 and blk.aq.bits == 3 and not blk.aq.signed
    assert isinstance(layers["stages.0.blocks.0.token_mixer.conv1"], QuantConv2d)
    assert keys <= set(m.state_dict())  # original keys kept (pretrained FP weights load as before)
    for _, l in quantized_layers(m):  # norms / GELU untouched
        assert not any(isinstance(c, (nn.BatchNorm2d, nn.GELU, nn.LayerNorm)) for c in l.modules())
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    assert blk.aq.step.grad is not None and blk.move_b4.bias.grad is not None
    torch.testing.assert_close(blk.weight, blk.wq(blk.raw_weight))  # .weight is the quantized weight
    assert quantize_model(m, dict(wbits=2, abits=3)) == {}  # already quantized layers are skipped


def test_policy_include_exclude_and_qkv_outputs():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj, self.cpb_fc1 = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(2, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.attn, self.head = nn.Conv2d(3, 8, 3), Attn(), nn.Linear(8, 4)

    net = Net()
    roles = quantize_model(net, dict(edge_layers=["stem", "head"], exclude=["*cpb*", "attn.proj"]))
    assert roles == {"stem": "edge", "attn.qkv": "block", "head": "edge"}
    assert net.attn.qkv.oq is not None and net.attn.qkv.oq.bits == 4 and net.head.oq is None
    assert type(net.attn.proj) is nn.Linear and type(net.attn.cpb_fc1) is nn.Linear
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_model(Net(), dict(wbits=5))
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(Net(), dict(include=["nothing"]))


@pytest.mark.parametrize("name,kw", [
    ("van_b0", dict(embed_dims=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
    ("msmlp_t", dict(embed_dim=20, depths=[1, 1, 1, 1])),
    ("davit_t", dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))),
])
def test_policy_other_families_train_step(name, kw):
    m = timm.create_model(name, num_classes=5, **kw)
    roles = quantize_model(m, dict(wbits=2, abits=2))
    assert list(roles.values()).count("edge") == 2
    assert not any(bool(q.initialized) for q in m.modules() if isinstance(q, LSQQuantizer))  # probe inits nothing
    if name.startswith("davit"):
        assert all(l.oq is not None for n, l in quantized_layers(m) if n.endswith("qkv"))
    called = set()
    for n, l in quantized_layers(m):
        l.register_forward_hook(lambda mod, i, o, n=n: called.add(n))
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    for n, l in quantized_layers(m):
        assert l.raw_weight.grad is not None, n  # weights quantized with a straight-through gradient
        # inputs quantized wherever the layer is called; fused ops (VAN's LKA, MS-MLP's mix-shift) read their
        # layers' weights without calling them: those layers have no input quantizer (no unused parameter: DDP)
        assert (roles[n] == "weight_only") == (n not in called), n
        assert (l.aq is None) if n not in called else (l.aq.step.grad is not None), n
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


# ---- CGA and oscillation ---------------------------------------------------------------------------------------
def _official_free_mask(w, bits, br):  # the loop of OFQ's freeze_outside_boundary_weight_idx (not frozen = free)
    s = 2 * w.abs().mean(1, keepdim=True)
    n = float(2 ** (bits - 1))
    b4 = torch.clamp(w / s, -1.0, 1.0 - 1e-6) * n - 0.5
    r = torch.round(b4)
    free = torch.zeros_like(w)
    for i in np.arange(r.min().item(), r.max().item()):
        free += (((b4 - i) <= 0.5 + br) & ((b4 - i) >= 0.5 - br)).float()
    return free.bool()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cga_mask_matches_official_loop(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    q = StatsQ(bits)
    mask = cga_free_mask(q.levels_before_round(w), 0.05)
    assert torch.equal(mask, _official_free_mask(w, bits, 0.05))
    assert 0 < mask.float().mean() < 0.5


def test_oscillation_tracker_counts_sign_flips():
    t = OscillationTracker(momentum=0.5)
    events = [t.update(torch.tensor([float(v)])) for v in [0, 1, 1, 0, 1, 2]]
    assert events == [0, 0, 0, 1, 1, 0]  # changes +1, 0, -1 (flip), +1 (flip), +1 (same direction)
    # freq: 0 -> 0 -> 0 -> .5 -> .75 -> .375
    torch.testing.assert_close(t.frequency(), torch.tensor([0.375]))


class _Stub:  # what the callback needs of trainer / pl_module outside Lightning
    def __init__(self, model, epoch, max_epochs):
        self.model, self.ema, self.logged = model, None, {}
        self.trainer = SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, global_step=0)

    def log(self, k, v, **kw):
        self.logged[k] = v


def test_cga_freezes_and_restores_through_weight_decay():
    torch.manual_seed(0)
    m = _ffnet()
    cb = OFQ(wbits=2, abits=4, cga_epochs=1, boundary_range=0.05)
    stub = _Stub(m, epoch=1, max_epochs=2)
    cb.setup(None, stub, "fit")
    x = torch.randn(4, 3, 32, 32)
    cb.on_train_batch_start(stub.trainer, stub, (x, None), 0)
    blocks = [l for _, l in quantized_layers(m) if l.role == "block"]
    before = [l.raw_weight.detach().clone() for l in blocks]
    free = [cga_free_mask(l.wq.levels_before_round(l.raw_weight), 0.05) for l in blocks]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.5)
    for _ in range(2):  # the second step: Adam's momentum would move frozen weights without the restore
        m(x).logsumexp(1).sum().backward()
        cb.on_before_optimizer_step(stub.trainer, stub, opt)
        opt.step()
        opt.zero_grad()
        cb.on_train_batch_end(stub.trainer, stub, None, None, 0)
        stub.trainer.global_step += 1
        if _ == 0:
            for l, b, f in zip(blocks, before, free):
                assert torch.equal(l.raw_weight.detach()[~f], b[~f])  # frozen: exactly unchanged
            assert any(not torch.equal(l.raw_weight.detach()[f], b[f]) for l, b, f in zip(blocks, before, free))
    assert 0.5 < stub.logged["ofq/cga_frozen"] < 1 and "ofq/osc_frac" in stub.logged and "ofq/osc_rate" in stub.logged
    stub.trainer.current_epoch = 0  # before the CGA phase nothing is frozen
    cb.on_before_optimizer_step(stub.trainer, stub, opt)
    assert cb._frozen == {}


def test_oscillation_lsq_weights_vs_statsq_logged():
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    fracs = {}
    for wq in ("lsq", "statsq"):
        m = _ffnet()
        cb = OFQ(wbits=2, abits=8, weight_quantizer=wq, osc_threshold=0.0)
        stub = _Stub(m, 0, 1)
        cb.setup(None, stub, "fit")
        cb.on_train_batch_start(stub.trainer, stub, (x, y), 0)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for step in range(4):
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
            stub.trainer.global_step = step + 1
            cb.on_train_batch_end(stub.trainer, stub, None, None, 0)
        fracs[wq] = cb.oscillating_fraction()
        assert stub.logged["ofq/osc_frac"] == pytest.approx(fracs[wq])
        assert set(cb.state_dict()["trackers"]) == {n for n, l in quantized_layers(m) if l.role == "block"}
    assert all(0 <= f <= 1 for f in fracs.values())


# ---- export ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wq", ["statsq", "lsq"])
def test_export_integer_weights_reproduce_logits(tmp_path, wq):
    m = _ffnet()
    cfg = dict(wbits=3, abits=4, weight_quantizer=wq)
    quantize_model(m, cfg)
    m.train()
    m(torch.randn(8, 3, 32, 32))  # initialise the LSQ steps (and BN statistics)
    m.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    path = tmp_path / "ffnet_w3a4.safetensors"
    export_quantized(m, path, cfg, "ffnet_t", dict(num_classes=10, **NANO))
    from safetensors.torch import load_file
    sd = load_file(str(path))
    codes = sd["stages.0.blocks.0.channel_mixer.fc1.weight.codes"]
    assert codes.dtype == torch.int8 and "stages.0.blocks.0.channel_mixer.fc1.weight" not in sd
    if wq == "statsq":
        assert set(codes.unique().tolist()) <= {-7, -5, -3, -1, 1, 3, 5, 7}
    head = sd["head.fc.weight.codes"].int()  # 8-bit LSQ codes of the classifier
    assert head.min() >= -128 and head.max() <= 127 and head.abs().max() > 7
    m2 = load_quantized(path)
    with torch.no_grad():
        out = m2(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.argmax(1).tolist() == ref.argmax(1).tolist()
    with pytest.raises(ValueError, match="not an OFQ export"):
        from safetensors.torch import save_file
        save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
        load_quantized(tmp_path / "x.safetensors")


# ---- Lightning + Hydra -----------------------------------------------------------------------------------------
def test_hydra_switch_composes():
    from hydra import compose, initialize
    from hydra.utils import instantiate
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose("train", overrides=["callbacks=ofq", "ofq.wbits=2", "ofq.abits=2", "ofq.cga_epochs=3"])
    cb = instantiate(cfg.callbacks.ofq)
    assert isinstance(cb, OFQ) and cb.cfg.wbits == 2 and cb.cfg.abits == 2 and cb.cga_epochs == 3
    assert "model_checkpoint" in cfg.callbacks


def test_lightning_fit_checkpoint_resume_and_eval_hook(tmp_path):
    import lightning as L
    from backbones.training import AtomicCheckpointIO, ImageClassifier, ImageDataModule

    def run(max_steps, ckpt=None):  # a 2-epoch plan (2 batches each) whose last epoch is the CGA phase
        dm = ImageDataModule(name="digits", batch_size=16, num_workers=0, input_size=32, crop_pct=1.0)
        mod = ImageClassifier("ffnet_t", num_classes=dm.num_classes, model_kwargs=NANO, ema_decay=0.9,
                              optimizer=dict(opt="adamw", lr=1e-3), scheduler=dict(sched="cosine"))
        dm.configure(mod.model.pretrained_cfg)
        cb = OFQ(wbits=2, abits=2, cga_epochs=1)
        ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
        tr = L.Trainer(max_epochs=2, max_steps=max_steps, limit_train_batches=2, limit_val_batches=1, callbacks=[cb, ck],
                       logger=False, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                       num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()])  # as train.py builds it
        tr.fit(mod, datamodule=dm, ckpt_path=ckpt, weights_only=False)  # as train.py does
        return mod, tr, cb

    mod, tr, cb = run(2)  # stops after the first epoch
    assert all(bool(q.initialized) for q in mod.model.modules() if isinstance(q, LSQQuantizer))
    ema_q = [q for q in mod.ema.module.modules() if isinstance(q, LSQQuantizer)]
    assert ema_q and all(bool(q.initialized) for q in ema_q)
    assert "ofq/osc_frac" in tr.callback_metrics and "ofq/cga_frozen" not in tr.callback_metrics
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["ofq"]["wbits"] == 2 and any(".aq.step" in k for k in ckpt["state_dict"])
    mod2, tr2, cb2 = run(-1, str(tmp_path / "last.ckpt"))  # resume: quantizers restored, not re-initialised
    assert tr2.current_epoch == 2 and "ofq/cga_frozen" in tr2.callback_metrics
    assert set(cb2.trackers) == set(cb.trackers)
    # what eval.py needs: rebuild the FP model, apply the recorded policy, load the Lightning state_dict
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    m = quantize_for_checkpoint(_ffnet(), ckpt)
    m.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    m.eval()
    mod2.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), mod2.model(x))
    # export as integer weights + scales (EMA weights, as eval uses them) and evaluate the export
    from backbones.quant import export_checkpoint, is_ofq_export
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "w2a2.safetensors")
    assert is_ofq_export(tmp_path / "w2a2.safetensors") and not is_ofq_export(tmp_path / "last.ckpt")
    deployed = load_quantized(tmp_path / "w2a2.safetensors")
    mod2.ema.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), mod2.ema.module(x), rtol=1e-5, atol=1e-5)
    # eval.py's loader takes both: the OFQ Lightning checkpoint (EMA weights) and the integer export
    from backbones.training import load_eval_model
    for path, source in ((tmp_path / "last.ckpt", "EMA weights"), (tmp_path / "w2a2.safetensors", "OFQ export")):
        loaded, where = load_eval_model("ffnet_t", NANO, 10, ckpt=str(path))
        assert where.startswith(source)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), mod2.ema.module(x), rtol=1e-5, atol=1e-5)


# ---- attention: probabilities and QKR (DaViT spatial window attention) -----------------------------------------
def _davit_tiny():
    torch.manual_seed(0)
    return timm.create_model("davit_t", num_classes=5, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                             num_heads=(1, 2, 4, 8), window_size=3)


def _identity_quantizers(m):
    from backbones.quant.quantizers import LSQQuantizer as LQ
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, (LQ, StatsQ)):
                setattr(mod, cname, nn.Identity())


def _halo_kwargs():  # HaloNet-H1 shape, 4 tiny stages, strided queries (block 2 -> 1 query per block) in 2-4
    from backbones.halonet import StageCfg
    return dict(stages=tuple(StageCfg("h", c, s, 1.0) for c, s in ((16, 1), (24, 2), (32, 2), (48, 2))),
                halo=dict(block_size=2, halo_size=1, num_heads=2), stem_type="7x7", stem_chs=16, stem_pool=True,
                num_features=0, act_layer="relu", zero_init_last=False)  # zero-init last BN: no gradient to attention


# tiny configurations of the attention families: (kwargs or a function returning them, input size)
ATTN_FAMILIES = {
    "davit_t": (dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=3), 40),
    "halo_h1": (_halo_kwargs, 64),
    "transnext_micro": (dict(embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 4, 4), depths=(1, 1, 1, 1), img_size=64), 64),
    "overlock_xt": (dict(depth=(1, 1, 1, 1), sub_depth=(2, 2), embed_dim=(8, 8, 16, 16), kernel_size=(5, 5, 7, 5),
                         sub_num_heads=(1, 2), sub_mlp_ratio=(3, 3), projection=16), 32),
}
QKR_FAMILIES = ("davit_t", "halo_h1")


def _attn_model(name):
    kw, size = ATTN_FAMILIES[name]
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=5, **(kw() if callable(kw) else kw))
    if hasattr(m, "set_aux_training"):  # OverLoCK: its aux head trains too, as in the training module
        m.set_aux_training(True)
    return m, size


def _loss(y):  # OverLoCK returns (logits, aux_logits) in training mode with its aux head on
    return sum(v.sum() for v in y) if isinstance(y, tuple) else y.sum()


@pytest.mark.parametrize("qkr", [False, True])
@pytest.mark.parametrize("name", list(ATTN_FAMILIES))
def test_attention_explicit_and_qkr_equal_fp_without_quantizers(name, qkr):
    """The explicit attention (probabilities as a tensor; QKR's W_q^T W_k logits) equals the family's fused op."""
    from backbones.quant import attention as qa
    m, size = _attn_model(name)
    m = m.double().eval()
    with torch.no_grad():  # zero-initialised tables (relative positions, biases) must not hide a mistake
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    names = qa.attention_modules(m, attn_probs=True, qkr=qkr)
    kinds = {type(m.get_submodule(n)).__name__ for n in names}
    expected = {"davit_t": {"WindowAttention", "ChannelAttention"}, "halo_h1": {"HaloAttention"},
                "transnext_micro": {"Attention", "AggregatedAttention"}, "overlock_xt": {"DynamicConvBlock"}}[name]
    assert kinds == expected
    if qkr and name == "davit_t":  # QKR drops the q and k biases (official); compare with a model that has none
        with torch.no_grad():
            for n in names:
                if type(m.get_submodule(n)).__name__ == "WindowAttention":
                    m.get_submodule(n).qkv.bias[:2 * m.get_submodule(n).qkv.in_features] = 0
    x = torch.randn(2, 3, size, size, dtype=torch.float64)  # DaViT: 10x10 maps padded to the 3x3 windows
    keys = set(m.state_dict())
    with torch.no_grad():
        ref = m(x)
    roles = qa.quantize_attention(m, names, 4, 4, qkr)
    assert set(roles.values()) == ({"attention", "attention_qkr"} if qkr and name == "davit_t" else
                                   {"attention_qkr"} if qkr and name in QKR_FAMILIES else {"attention"})
    assert keys <= set(m.state_dict())  # same keys (pretrained weights load as before)
    assert qa.attention_modules(m) == []  # idempotent: nothing left to swap
    _identity_quantizers(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-12)


def test_families_declare_their_attention():
    """Each family declares its attention classes (``backbones._common.ofq_attention``) and OFQ implements every
    declared kind: a family class that loses its declaration, or a kind OFQ does not know, fails here."""
    from backbones import davit, halonet, overlock, transnext
    from backbones._common import OFQ_ATTENTION
    from backbones.quant import attention as qa
    assert OFQ_ATTENTION == {"davit_window": davit.WindowAttention, "davit_channel": davit.ChannelAttention,
                             "halo": halonet.HaloAttention, "transnext_full": transnext.Attention,
                             "transnext_aggregated": transnext.AggregatedAttention,
                             "overlock_contmix": overlock.DynamicConvBlock}
    assert set(OFQ_ATTENTION) == set(qa.SWAPS) | set(qa.HOOKS) and not set(qa.SWAPS) & set(qa.HOOKS)
    for name in ATTN_FAMILIES:  # every module with attention heads in the model is a declared one
        m, _ = _attn_model(name)
        heads = {n for n, mod in m.named_modules() if hasattr(mod, "num_heads")}
        assert heads and heads == set(qa.attention_modules(m)), name

    class Undeclared(nn.Module):
        ofq_kind = "no_such_kind"
    with pytest.raises(ValueError, match="no_such_kind"):
        qa.attention_modules(nn.Sequential(Undeclared()))


def _probs_quantizers(m):
    return [(n, q) for n, q in m.named_modules() if isinstance(q, LSQQuantizer)
            and (n.endswith(("probs_q", "probs_quant")) or ".probs_quant." in n)]


@pytest.mark.parametrize("name", ["halo_h1", "transnext_micro", "overlock_xt"])
def test_policy_quantizes_probs_and_qkr_trains(name):
    m, size = _attn_model(name)
    with torch.no_grad():  # OverLoCK's kernels start near uniform (rpb = 0): 2-bit LSQ would round all to 0
        for n, p in m.named_parameters():
            if "rpb" in n:
                p.normal_()
    qkr = name in QKR_FAMILIES
    roles = quantize_model(m, dict(wbits=2, abits=2, qkr=True))
    attn = [n for n, r in roles.items() if r.startswith("attention")]
    assert len(attn) == 4 and all(roles[n] == ("attention_qkr" if qkr else "attention") for n in attn)
    if qkr:  # QKR owns the q and kv projections; without it they are QuantConv2d with quantized outputs
        assert not any(f"{n}.q" in roles or f"{n}.kv" in roles for n in attn)
        m2, _ = _attn_model(name)
        quantize_model(m2, dict(wbits=2, abits=2))
        assert all(m2.get_submodule(f"{n}.{c}").oq is not None for n in attn for c in ("q", "kv"))
    pq = _probs_quantizers(m)
    assert len(pq) == (8 if name == "overlock_xt" else 4)
    for n, q in pq:  # one step per query position of a halo block, else per head (token count = resolution)
        a = m.get_submodule(n.rsplit(".", 2 if name == "overlock_xt" else 1)[0])
        assert q.step.numel() == ((a.block_size // a.q_stride) ** 2 if name == "halo_h1" else a.num_heads), n
    if name == "halo_h1":
        assert sorted(q.step.numel() for _, q in pq) == [1, 1, 1, 4]  # strided queries: 1 per block of 2x2 keys
    seen = {}
    for n, q in pq:
        q.register_forward_hook(lambda mod, i, o, n=n: seen.update({n: (i[0].detach(), o.detach())}))
    _loss(m(torch.randn(2, 3, size, size))).backward()
    assert set(seen) == {n for n, _ in pq}
    for n, q in pq:
        p, o = seen[n]
        assert torch.allclose(p.sum(-1), torch.ones(()).double().to(p.dtype), atol=1e-5)  # softmax probabilities
        shape = [1] * o.ndim
        shape[q.dim] = -1
        lv = torch.round(o / q.step.detach().view(shape))
        assert set(lv.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0} and len(lv.unique()) > 1, n  # unsigned 2-bit
        assert q.step.grad is not None and q.step.grad.abs().sum() > 0, n
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)  # nothing unused (DDP)
    if qkr:
        a = m.get_submodule(attn[0])
        assert a.qkx_q.step.grad is not None and a.q.weight.grad is not None and a.kv.weight.grad is not None
        assert not a.x_q.signed and a.qkx_q.signed  # block input after ReLU: unsigned, detected on the first batch
        a.cga_active, a.boundary_range = True, 0.05  # CGA inside the W_qk quantizer
        m.zero_grad()
        _loss(m(torch.randn(2, 3, size, size))).backward()
        assert a.kv.weight.grad is not None


def test_davit_policy_quantizes_probs_and_qkr_trains():
    from backbones.quant.attention import QuantWindowAttention
    m = _davit_tiny()
    roles = quantize_model(m, dict(wbits=2, abits=2, qkr=True))
    attn = [n for n, r in roles.items() if r == "attention_qkr"]
    assert attn and all(f"{n}.qkv" not in roles for n in attn)  # QKR owns q/k/v quantization
    a = m.get_submodule(attn[0])
    seen = {}
    a.probs_q.register_forward_hook(lambda mod, i, o: seen.update(o=o.detach()))
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    step = a.probs_q.step.detach().view(-1, 1)
    assert set(torch.unique(torch.round(seen["o"] / step)).tolist()) <= {0.0, 1.0, 2.0, 3.0}  # unsigned 2-bit
    assert a.qkv.weight.grad is not None and a.qkx_q.step.grad is not None and a.probs_q.step.grad is not None
    a.cga_active, a.boundary_range = True, 0.05  # CGA inside the W_qk quantizer: frozen entries pass no gradient
    a.qkv.weight.grad = None
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert a.qkv.weight.grad is not None
    m2 = _davit_tiny()
    roles2 = quantize_model(m2, dict(wbits=4, abits=4))
    assert "attention" in roles2.values() and isinstance(m2.get_submodule(attn[0]), QuantWindowAttention)
    assert m2.get_submodule(attn[0]).qkv.oq is not None


@pytest.mark.parametrize("name", ["ffnet_t", *ATTN_FAMILIES])
def test_bf16_autocast_forward_backward(name):
    m, size = (_ffnet(), 32) if name == "ffnet_t" else _attn_model(name)
    quantize_model(m, dict(wbits=2, abits=2, qkr=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(2, 3, size, size))
    assert (y[0] if isinstance(y, tuple) else y).dtype == torch.bfloat16
    _loss(y).float().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_attn_probs_and_qkr_switches():
    from backbones.quant.attention import QuantHaloAttention
    m, _ = _attn_model("halo_h1")
    roles = quantize_model(m, dict(attn_probs=False))  # the fused op stays; q / kv outputs still quantized
    assert "attention" not in roles.values() and type(m.stages[1][0].self_attn).__name__ == "HaloAttention"
    m, _ = _attn_model("halo_h1")
    roles = quantize_model(m, dict(attn_probs=False, qkr=True))  # QKR without probability quantizers
    a = m.stages[1][0].self_attn
    assert isinstance(a, QuantHaloAttention) and a.qkr and a.probs_q is None
    assert roles["stages.1.0.self_attn"] == "attention_qkr"
    m, _ = _attn_model("transnext_micro")
    roles = quantize_model(m, dict(attn_probs=False, qkr=True))  # no QKR for cosine attention: nothing swapped
    assert not any(r.startswith("attention") for r in roles.values())


@pytest.mark.parametrize("name", QKR_FAMILIES)
def test_qkr_export_reproduces_logits(tmp_path, name):
    m, size = _attn_model(name)
    cfg = dict(wbits=3, abits=4, qkr=True)
    quantize_model(m, cfg)
    m(torch.randn(4, 3, size, size))  # initialise the LSQ steps
    m.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = m(x)
    kw = ATTN_FAMILIES[name][0]
    kw = dict(num_classes=5, **kw) if name == "davit_t" else {}  # HaloNet StageCfgs are not JSON: pass the model
    export_quantized(m, tmp_path / "qkr.safetensors", cfg, name, kw)
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "qkr.safetensors"))
    attn = "stages.0.blocks.0.0.attn" if name == "davit_t" else "stages.1.0.self_attn"
    assert f"{attn}.wqk.codes" in sd and f"{attn}.wv.codes" in sd
    replaced = ["qkv.weight"] if name == "davit_t" else ["q.weight", "kv.weight"]
    assert not any(f"{attn}.{k}" in sd for k in replaced)
    if name == "halo_h1":
        assert f"{attn}.wq.codes" in sd  # the relative-position logits need the (quantized) query weight
    with torch.no_grad():
        deployed = load_quantized(tmp_path / "qkr.safetensors", None if kw else _attn_model(name)[0])(x)
    torch.testing.assert_close(deployed, ref, rtol=1e-5, atol=1e-5)


def test_compile_quantized_model_equals_eager():
    """torch.compile (aot_eager, fullgraph: no graph break) of a quantized model, LSQ steps initialised eagerly by
    the first batch: forward and backward equal eager. HaloNet with QKR covers StatsQ, LSQ (per channel, per head,
    unsigned probabilities), the shifts and the explicit attention."""
    m, size = _attn_model("halo_h1")
    quantize_model(m, dict(wbits=2, abits=2, qkr=True))
    x = torch.randn(2, 3, size, size)
    m(x)  # eager first batch (the callback's calibration): the initialisation is eager-only
    y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = m(x)
    ref.sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
