"""Quantized attention: attention probabilities quantized (unsigned LSQ between the softmax and the weighted sum)
and, where the attention has explicit q and k projections, OFQ's query-key reparameterisation (QKR).

Every family's attention runs its softmax inside a fused op (``ops.window_attention`` / ``channel_attention`` /
``halo_attention`` / ``aggregated_attention``, SDPA) or hands the probabilities to one (OverLoCK's ``na2d_av``).
The families declare these modules with ``backbones._common.ofq_attention(kind)``; ``SWAPS`` and ``HOOKS`` below
say how each kind is quantized:
  * hooks: the family module has a ``probs_quant`` slot; while a quantizer sits there it computes the attention
    explicitly (the op's reference math, in the family file) and passes the probabilities through it;
  * swaps (the kinds with QKR, whose logits QKR computes differently): an explicit module here replaces the family
    module, adopting its parameters and submodules (state-dict keys unchanged).
With every quantizer switched off each equals the family's fused module (tested).

Probability quantizer (official ``QAttention``: unsigned LSQ, one step per query token). Granularity per family:
  * DaViT spatial window attention (``QuantWindowAttention``): windows of fixed ``N = window**2`` tokens: one step
    per query token of the window (official);
  * HaloNet (``QuantHaloAttention``): every query block has the same ``(block/stride)**2`` queries attending their
    haloed window: one step per query position inside the block (the official rule, resolution independent);
  * DaViT channel attention (hook): the map is ``head_dim x head_dim`` (channels attend to
    channels): one step per query channel (fixed count);
  * TransNeXt full and aggregated attention (hooks): the number
    of query tokens ``H*W`` depends on the resolution: ONE STEP PER HEAD. Aggregated attention quantizes the
    softmax weights (local window and pooled tokens, one softmax); the learnable-token term added to the local
    weights after the softmax (a signed, query-dependent bias, not a probability) stays full precision;
  * OverLoCK ContMix (hook, ``ContMixProbs``): its two softmax-normalised
    dynamic kernels (``5x5`` and ``kxk``, one per pixel) go to ``na2d_av``; the pixel count depends on the
    resolution: ONE STEP PER HEAD, a quantizer per kernel.
The probabilities are quantized before attention dropout.

QKR (official ``QAttention_qkreparam``; DaViT spatial attention and HaloNet, the families with plain ``q.k``
logits: TransNeXt normalises q and k (cosine attention) and OverLoCK has no q.k product, so they have none): per
head ``W_qk = W_q^T W_k`` (``C x C``), StatsQ-quantized row-wise as a ``(heads * C, C)`` matrix; the block input is
LSQ-quantized once (``x_q``, between shifts); ``W_qk x`` is LSQ-quantized between shifts over ``heads * C``
channels; logits ``x_n . (W_qk x_m) * d**-0.5``; ``v = x W_v^T + b_v`` with StatsQ ``W_v``, LSQ per channel
between shifts. As in the official code the q and k biases are dropped (``q.k`` no longer has a bias term; HaloNet
has none). Under CGA (``cga_active``, set by the callback) the entries of ``W_qk`` outside the rounding boundaries
get no gradient (official ``StatsQuantizer_specific_4_qkreparam_cga``).
  * DaViT (fixed ``N`` tokens per window): ``x_q`` one step per token, ``W_qk x`` one step per (token, head)
    (official);
  * HaloNet (token count depends on the resolution): ``x_q`` one step per input channel (its sign detected on the
    first batch, as the layer policy's inputs: HaloNet's attention input follows BN + ReLU), ``W_qk x`` one step per
    head. HaloNet's relative-position logits ``q . rel_pos`` need the query itself: ``q_rel = StatsQ(W_q) x_q``
    (LSQ per channel between shifts) computes them; ``W_q`` thus also stays a (quantized) weight.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops.halo_attention import halo_attention_explicit

from .oscillation import cga_free_mask
from .quantizers import LSQQuantizer, LearnableShift, StatsQ

__all__ = ["ContMixProbs", "QKRAttention", "QuantHaloAttention", "QuantWindowAttention", "attention_modules",
           "quantize_attention"]


def _to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:  # (B, H, W, C) -> (B * nW, ws * ws, C)
    B, H, W, C = x.shape
    x = x.reshape(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def _from_windows(x: torch.Tensor, B: int, H: int, W: int, ws: int) -> torch.Tensor:
    C = x.shape[-1]
    x = x.reshape(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def _statsq_cga(w: torch.Tensor, bits: int, boundary_range: float) -> torch.Tensor:
    """StatsQ whose entries outside the CGA boundaries pass no gradient (official qkreparam_cga quantizer)."""
    free = cga_free_mask(StatsQ(bits).levels_before_round(w), boundary_range)
    return torch.where(free, StatsQ(bits)(w), StatsQ(bits)(w.detach()))


def _adopt(dst: nn.Module, m: nn.Module, attrs: Tuple[str, ...]) -> None:
    """Give ``dst`` the parameters, buffers and submodules of ``m`` under the same names (same state-dict keys)
    and copy the plain attributes ``attrs``."""
    for k, p in m._parameters.items():
        dst.register_parameter(k, p)
    for k, b in m._buffers.items():
        dst.register_buffer(k, b, persistent=k not in m._non_persistent_buffers_set)
    for k, c in m._modules.items():
        dst.add_module(k, c)
    for k in attrs:
        setattr(dst, k, getattr(m, k))
    dst.train(m.training)


def _probs_quantizer(probs: bool, abits: int, channels: int, dim: int) -> Optional[LSQQuantizer]:
    return LSQQuantizer(abits, channels, dim=dim, signed=False) if probs else None


def _q(quantizer: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


class QKRAttention(nn.Module):
    """What the QKR modules share: the quantized ``W_v`` / ``W_qk`` (/ ``W_q``), CGA inside the ``W_qk`` quantizer
    and the export interface (``qkr_weights``, ``qkr_keys``, ``deployed``)."""
    qkr_keys: Tuple[str, ...] = ()  # state-dict keys (relative to the module) QKR replaces in an export

    def _init_qkr(self, wbits: int) -> None:
        self.wbits, self.cga_active, self.boundary_range = wbits, False, 0.005
        self.deployed: Optional[Dict[str, torch.Tensor]] = None  # de-quantized exported weights (load_quantized)
        self.qk_quant, self.v_quant = StatsQ(wbits), StatsQ(wbits)

    def qkr_weights(self) -> Dict[str, torch.Tensor]:  # full-precision 2-D weights: {'wv', 'wqk'[, 'wq']}
        raise NotImplementedError

    def quant_weights(self) -> Dict[str, torch.Tensor]:
        """StatsQ of every ``qkr_weights`` entry (CGA on ``wqk`` when active), or the exported weights once
        ``deployed``."""
        if self.deployed is not None:
            return self.deployed
        out = {}
        for k, w in self.qkr_weights().items():
            if k == "wqk" and self.cga_active and self.training:
                out[k] = _statsq_cga(w, self.wbits, self.boundary_range)
            else:
                out[k] = (self.qk_quant if k == "wqk" else self.v_quant)(w)
        return out


# ---- DaViT -------------------------------------------------------------------------------------------------------
class QuantWindowAttention(QKRAttention):
    """DaViT's spatial window attention (``backbones.davit.WindowAttention``: pad to the window, ``qkv``, window
    attention, crop, ``proj``), explicit; probabilities one step per query token of the window."""
    qkr_keys = ("qkv.weight",)

    def __init__(self, m: nn.Module, abits: int, wbits: int, qkr: bool = False, probs: bool = True):
        super().__init__()
        _adopt(self, m, ("num_heads", "window_size"))
        self.qkr = qkr
        C = m.qkv.in_features
        N = self.window_size ** 2
        self.probs_q = _probs_quantizer(probs, abits, N, -2)
        self._init_qkr(wbits)
        if qkr:
            H = self.num_heads
            self.x_move_b4, self.x_q, self.x_move_aft = LearnableShift(C), LSQQuantizer(abits, N, 1), LearnableShift(C)
            self.qkx_move_b4, self.qkx_move_aft = LearnableShift(H * C), LearnableShift(H * C)
            self.qkx_q = LSQQuantizer(abits, N * H, 1)
            self.v_move_b4, self.v_q, self.v_move_aft = LearnableShift(C), LSQQuantizer(abits, C, -1), LearnableShift(C)

    def qk_product(self) -> torch.Tensor:
        """``W_qk`` of every head stacked as ``(heads * C, C)`` (full precision, from ``qkv.weight``)."""
        w, h = self.qkv.weight, self.num_heads
        C = w.shape[1]
        wq, wk = w[:C].reshape(h, -1, C), w[C:2 * C].reshape(h, -1, C)
        return (wq.transpose(-2, -1) @ wk).reshape(h * C, C)

    def qkr_weights(self) -> Dict[str, torch.Tensor]:
        C = self.qkv.weight.shape[1]
        return {"wv": self.qkv.weight[2 * C:], "wqk": self.qk_product()}

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: windows ``(b, N, C)`` of block input -> attention output ``(b, N, C)`` (before ``proj``)."""
        b, N, C = x.shape
        h = self.num_heads
        d = C // h
        if not self.qkr:
            q, k, v = self.qkv(x).reshape(b, N, 3, h, d).permute(2, 0, 3, 1, 4)
            probs = (q @ k.transpose(-2, -1) * d ** -0.5).softmax(-1)
        else:
            x = self.x_move_aft(self.x_q(self.x_move_b4(x)))
            bias_v = self.qkv.bias[2 * C:] if self.qkv.bias is not None else None
            w = self.quant_weights()
            v = self.v_move_aft(self.v_q(self.v_move_b4(F.linear(x, w["wv"], bias_v))))
            v = v.reshape(b, N, h, d).transpose(1, 2)
            qkx = torch.einsum("hdc,bnc->bnhd", w["wqk"].reshape(h, C, C), x).reshape(b, N, h * C)
            qkx = self.qkx_move_b4(qkx).reshape(b, N * h, C)
            qkx = self.qkx_move_aft(self.qkx_q(qkx).reshape(b, N, h * C)).reshape(b, N, h, C)
            probs = (torch.einsum("bnc,bmhc->bhnm", x, qkx) * d ** -0.5).softmax(-1)
        probs = _q(self.probs_q, probs)
        return (probs @ v).transpose(1, 2).reshape(b, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        xp = F.pad(x, (0, 0, 0, -W % ws, 0, -H % ws))
        Hp, Wp = xp.shape[1:3]
        out = _from_windows(self._attend(_to_windows(xp, ws)), B, Hp, Wp, ws)
        return self.proj(out[:, :H, :W])


# ---- HaloNet -----------------------------------------------------------------------------------------------------
def _shifted(abits: int, channels: int, steps: int, signed: Optional[bool] = True):
    """``(shift before, LSQ with ``steps`` steps along dim 1, shift after)`` over ``channels`` channels (dim 1)."""
    return LearnableShift(channels, 1), LSQQuantizer(abits, steps, 1, signed), LearnableShift(channels, 1)


class QuantHaloAttention(QKRAttention):
    """HaloNet's halo attention (``backbones.halonet.HaloAttention``: ``q`` 1x1 conv with the query stride, ``kv``
    1x1 conv with per-head ``[k, v]`` channels, ``ops.halo_attention``), explicit; probabilities one step per query
    position of the block; optional QKR (see the module doc)."""
    qkr_keys = ("q.weight", "kv.weight")

    def __init__(self, m: nn.Module, abits: int, wbits: int, qkr: bool = False, probs: bool = True):
        super().__init__()
        _adopt(self, m, ("num_heads", "dim_head_qk", "dim_head_v", "block_size", "halo_size", "q_stride"))
        self.qkr = qkr
        self.probs_q = _probs_quantizer(probs, abits, (self.block_size // self.q_stride) ** 2, -2)
        self._init_qkr(wbits)
        if qkr:
            C, h = self.kv.in_channels, self.num_heads
            dv, dq = h * self.dim_head_v, h * self.dim_head_qk
            # NCHW tensors: shifts and steps along dim 1; signed LSQ as the official QKR quantizers, except the
            # block input (after BN + ReLU here, after LayerNorm in the official ViTs): its sign from the first batch
            self.x_move_b4, self.x_q, self.x_move_aft = _shifted(abits, C, C, signed=None)
            self.qkx_move_b4, self.qkx_q, self.qkx_move_aft = _shifted(abits, h * C, h)  # on (B, h, C, H, W)
            self.v_move_b4, self.v_q, self.v_move_aft = _shifted(abits, dv, dv)
            self.qr_move_b4, self.qr_q, self.qr_move_aft = _shifted(abits, dq, dq)

    def _split_kv(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W_k, W_v)`` per head: ``(h, dqk, C)``, ``(h, dv, C)`` from ``kv.weight`` (heads-major ``[k, v]``)."""
        w = self.kv.weight.flatten(1).view(self.num_heads, self.dim_head_qk + self.dim_head_v, -1)
        return w[:, :self.dim_head_qk], w[:, self.dim_head_qk:]

    def qk_product(self) -> torch.Tensor:
        """``W_qk = W_q^T W_k`` of every head stacked as ``(heads * C, C)`` (full precision)."""
        wk, _ = self._split_kv()
        wq = self.q.weight.flatten(1).view(self.num_heads, self.dim_head_qk, -1)
        C = wq.shape[-1]
        return (wq.transpose(-2, -1) @ wk).reshape(-1, C)

    def qkr_weights(self) -> Dict[str, torch.Tensor]:
        _, wv = self._split_kv()
        return {"wv": wv.reshape(-1, wv.shape[-1]), "wqk": self.qk_product(), "wq": self.q.weight.flatten(1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, dqk, s = self.num_heads, self.dim_head_qk, self.q_stride
        scale = dqk ** -0.5
        if not self.qkr:
            q = self.q(x).unflatten(1, (h, dqk))
            k, v = self.kv(x).unflatten(1, (h, -1)).split([dqk, self.dim_head_v], dim=2)
            qc, kc, qr = q, k, q
        else:
            B, C, H, W = x.shape
            x = self.x_move_aft(self.x_q(self.x_move_b4(x)))
            w = self.quant_weights()
            v = self.v_move_aft(self.v_q(self.v_move_b4(F.conv2d(x, w["wv"][:, :, None, None]))))
            v = v.unflatten(1, (h, -1))
            qkx = self.qkx_move_b4(F.conv2d(x, w["wqk"][:, :, None, None]))
            kc = self.qkx_move_aft(self.qkx_q(qkx.unflatten(1, (h, C))).flatten(1, 2)).unflatten(1, (h, C))
            xq = x[:, :, ::s, ::s]  # the positions a 1x1 conv with stride s reads
            qc = xq.unsqueeze(1)
            qr = self.qr_move_aft(self.qr_q(self.qr_move_b4(F.conv2d(xq, w["wq"][:, :, None, None]))))
            qr = qr.unflatten(1, (h, dqk))
        out = halo_attention_explicit(qc, kc, v, qr, self.rel_pos_h, self.rel_pos_w, self.block_size,
                                      self.halo_size, s, scale, lambda p: _q(self.probs_q, p))
        return self.pool(out)


# ---- OverLoCK ----------------------------------------------------------------------------------------------------
class ContMixProbs(nn.Module):
    """Quantizers of OverLoCK ContMix's two dynamic kernels (``[B, heads, H, W, taps]`` softmax outputs), set as
    ``DynamicConvBlock.probs_quant``: unsigned LSQ, one step per head (the pixel count depends on the resolution)."""

    def __init__(self, heads: int, abits: int):
        super().__init__()
        self.small_q = LSQQuantizer(abits, heads, dim=1, signed=False)
        self.large_q = LSQQuantizer(abits, heads, dim=1, signed=False)

    def forward(self, attn_s: torch.Tensor, attn_k: torch.Tensor):
        return self.small_q(attn_s), self.large_q(attn_k)


# ---- which modules -----------------------------------------------------------------------------------------------
# The families declare their attention modules (``backbones._common.ofq_attention``); each declared kind is either
# swapped for an explicit module here (the QKR-capable ones) or given a probability quantizer through its
# ``probs_quant`` hook (the family module then computes the attention explicitly itself).
def _per_head_probs(m: nn.Module, abits: int) -> nn.Module:  # (B, heads, queries, keys): the token count varies
    return LSQQuantizer(abits, m.num_heads, dim=1, signed=False)


def _per_query_channel_probs(m: nn.Module, abits: int) -> nn.Module:  # (B, heads, d, d): d queries, fixed
    return LSQQuantizer(abits, m.qkv.in_features // m.num_heads, dim=-2, signed=False)


def _contmix_probs(m: nn.Module, abits: int) -> nn.Module:
    return ContMixProbs(m.num_heads, abits)


SWAPS = {"davit_window": QuantWindowAttention, "halo": QuantHaloAttention}  # kind -> explicit module
HOOKS = {"davit_channel": _per_query_channel_probs, "transnext_full": _per_head_probs,  # kind -> probs_quant
         "transnext_aggregated": _per_head_probs, "overlock_contmix": _contmix_probs}


def _kind(m: nn.Module):
    """The swap class or hook factory for ``m``; None when ``m`` is no declared attention or is quantized already."""
    kind = getattr(type(m), "ofq_kind", None)
    if kind is None:
        return None
    if kind in SWAPS:
        return SWAPS[kind]
    if kind in HOOKS:
        return HOOKS[kind] if getattr(m, "probs_quant", None) is None else None
    raise ValueError(f"{type(m).__qualname__} declares the OFQ attention kind {kind!r}, which backbones.quant.attention "
                     f"does not implement (known: {sorted(SWAPS) + sorted(HOOKS)})")


def supports_qkr(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, QKRAttention)


def attention_modules(model: nn.Module, attn_probs: bool = True, qkr: bool = False) -> List[str]:
    """Names of the attention modules of ``model`` that ``quantize_attention`` handles: every supported one when
    ``attn_probs``, else (``qkr`` only) those with QKR."""
    out = []
    for n, m in model.named_modules():
        kind = _kind(m)
        if kind is not None and (attn_probs or (qkr and supports_qkr(kind))):
            out.append(n)
    return out


def qkr_owned(model: nn.Module, names: List[str]) -> List[str]:
    """Layers that QKR quantizes itself (left alone by the layer policy): the q/k/v projections of ``names``."""
    out = []
    for n in names:
        kind = _kind(model.get_submodule(n))
        if supports_qkr(kind):
            out += [f"{n}.{k.rsplit('.', 1)[0]}" for k in kind.qkr_keys]
    return out


def quantize_attention(model: nn.Module, names: list, abits: int, wbits: int, qkr: bool = False,
                       attn_probs: bool = True) -> Dict[str, str]:
    """Quantize the attention modules ``names`` (from ``attention_modules``; after the linears were swapped): swap
    in the explicit module, or set the family module's ``probs_quant``. Returns ``{name: role}``, role
    ``attention_qkr`` where QKR applies, else ``attention``."""
    roles = {}
    for n in names:
        m = model.get_submodule(n)
        kind = _kind(m)
        if kind is None:
            raise ValueError(f"{n} ({type(m).__name__}) is not a supported attention module")
        use_qkr = qkr and supports_qkr(kind)
        device = next(m.parameters()).device
        if isinstance(kind, type):
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    kind(m, abits, wbits, use_qkr, attn_probs).to(device))
        else:
            m.probs_quant = kind(m, abits).to(device)
        roles[n] = "attention_qkr" if use_qkr else "attention"
    return roles
