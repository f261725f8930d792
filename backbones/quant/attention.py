"""Quantized attention for families whose attention weights are computed inside a fused op: attention
probabilities quantized (official: unsigned LSQ, one step per query token) and, optionally, OFQ's query-key
reparameterisation (QKR).

Handled now: DaViT's spatial window attention (``backbones.davit.WindowAttention``: pad to the window, ``qkv``
Linear, window attention, crop, ``proj``). Its windows have a fixed token count ``N = window**2``, so the
official per-token step sizes are resolution independent and are used as in the official ``QAttention``.

QKR (official ``QAttention_qkreparam``): per head ``W_qk = W_q^T W_k`` (``C x C``), StatsQ-quantized row-wise as a
``(heads * C, C)`` matrix; the block input is LSQ-quantized once (``quant_x``, between shifts, one step per
token); ``W_qk x`` is LSQ-quantized (one step per (token, head), between shifts over ``heads * C`` channels);
logits ``x_n . (W_qk x_m) * d**-0.5``; ``v = x W_v^T + b_v`` with StatsQ ``W_v``, LSQ per channel between shifts.
As in the official code the q and k biases are dropped (``q.k`` no longer has a bias term). Under CGA
(``cga_active``, set by the callback) the entries of ``W_qk`` outside the rounding boundaries get no gradient
(official ``StatsQuantizer_specific_4_qkreparam_cga``). State-dict keys of ``qkv`` / ``proj`` are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .oscillation import cga_free_mask
from .quantizers import LSQQuantizer, LearnableShift, StatsQ

__all__ = ["QuantWindowAttention", "attention_modules", "quantize_attention"]


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


class QuantWindowAttention(nn.Module):
    def __init__(self, m: nn.Module, abits: int, wbits: int, qkr: bool = False):
        super().__init__()
        self.num_heads, self.window_size, self.qkr = m.num_heads, m.window_size, qkr
        self.qkv, self.proj = m.qkv, m.proj
        C = self.proj.in_features if hasattr(self.proj, "in_features") else m.qkv.out_features // 3
        N = self.window_size ** 2
        self.wbits, self.cga_active, self.boundary_range = wbits, False, 0.005
        self.deployed = None  # QKR: (W_v, W_qk) de-quantized from an export (``load_quantized``)
        self.probs_q = LSQQuantizer(abits, N, dim=-2, signed=False)
        if qkr:
            self.x_move_b4, self.x_q, self.x_move_aft = LearnableShift(C), LSQQuantizer(abits, N, 1), LearnableShift(C)
            self.qk_quant, self.v_quant = StatsQ(wbits), StatsQ(wbits)
            H = self.num_heads
            self.qkx_move_b4, self.qkx_move_aft = LearnableShift(H * C), LearnableShift(H * C)
            self.qkx_q = LSQQuantizer(abits, N * H, 1)
            self.v_move_b4, self.v_q, self.v_move_aft = LearnableShift(C), LSQQuantizer(abits, C, -1), LearnableShift(C)

    def qk_product(self) -> torch.Tensor:
        """``W_qk`` of every head stacked as ``(heads * C, C)`` (full precision, from ``qkv.weight``)."""
        w, h = self.qkv.weight, self.num_heads
        C = w.shape[1]
        wq, wk = w[:C].reshape(h, -1, C), w[C:2 * C].reshape(h, -1, C)
        return (wq.transpose(-2, -1) @ wk).reshape(h * C, C)

    def quant_weights(self):
        """QKR: ``(StatsQ(W_v), StatsQ(W_qk))``, or the exported integer weights once ``deployed``."""
        if self.deployed is not None:
            return self.deployed
        C = self.qkv.weight.shape[1]
        wqk = self.qk_product()
        wqk = _statsq_cga(wqk, self.wbits, self.boundary_range) if (self.cga_active and self.training) \
            else self.qk_quant(wqk)
        return self.v_quant(self.qkv.weight[2 * C:]), wqk

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
            wv, wqk = self.quant_weights()
            v = self.v_move_aft(self.v_q(self.v_move_b4(F.linear(x, wv, bias_v))))
            v = v.reshape(b, N, h, d).transpose(1, 2)
            qkx = torch.einsum("hdc,bnc->bnhd", wqk.reshape(h, C, C), x).reshape(b, N, h * C)
            qkx = self.qkx_move_b4(qkx).reshape(b, N * h, C)
            qkx = self.qkx_move_aft(self.qkx_q(qkx).reshape(b, N, h * C)).reshape(b, N, h, C)
            probs = (torch.einsum("bnc,bmhc->bhnm", x, qkx) * d ** -0.5).softmax(-1)
        probs = self.probs_q(probs)
        return (probs @ v).transpose(1, 2).reshape(b, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        xp = F.pad(x, (0, 0, 0, -W % ws, 0, -H % ws))
        Hp, Wp = xp.shape[1:3]
        out = _from_windows(self._attend(_to_windows(xp, ws)), B, Hp, Wp, ws)
        return self.proj(out[:, :H, :W])


def _davit_window_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "WindowAttention" and type(m).__module__ == "backbones.davit"


def attention_modules(model: nn.Module) -> list:
    """Names of the supported attention modules of ``model``."""
    return [n for n, m in model.named_modules() if _davit_window_attention(m)]


def quantize_attention(model: nn.Module, names: list, abits: int, wbits: int, qkr: bool = False) -> list:
    """Swap the attention modules ``names`` (from ``attention_modules``) for their quantized version (after the
    linears were swapped). Returns ``names``."""
    for n in names:
        parent, _, child = n.rpartition(".")
        m = model.get_submodule(n)
        setattr(model.get_submodule(parent) if parent else model, child, QuantWindowAttention(m, abits, wbits, qkr))
    return names
