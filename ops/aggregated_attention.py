"""Aggregated attention: TransNeXt's pixel-focused token mixer (arXiv:2311.17132).

Every query pixel attends, in ONE softmax, to its ``K x K`` sliding-window neighbours (fine, local keys) and to
``P`` pooled tokens (coarse, global keys). Cosine similarity with a learnable per-head temperature, a learnable
query embedding and a length-dependent scale; no ``1/sqrt(d)`` factor. Learnable "tokens" add a query-dependent
term to the local weights AFTER the softmax.

Exact semantics (``aggregated_attention_reference`` is the definition; a Triton kernel must match it). Shapes:
batch ``B``, heads ``h``, head dim ``d``, query grid ``H x W`` with ``N = H*W`` tokens in row-major order,
``P`` pooled tokens, window ``K`` (odd), ``L = K*K``. For batch b, head h and query pixel ``n = (i, j)``::

    qn      = q / max(|q|, 1e-12)                                   (F.normalize over d)
    valid_z = neighbour z = (i + z // K - K // 2, j + z % K - K // 2) lies inside the H x W grid
    s_n     = log(#valid(n) + P), computed in float32, then cast to q's dtype
    qs      = (qn + query_embedding[h]) * softplus(temperature[h]) * s_n
    local   a_z = <qs, normalize(k)[nbr(n, z)]> + rpb_local[h, z]     if valid_z else -inf
    pooled  a_m = <qs, normalize(k_pool)[m]> + pool_bias[h, n, m]
    w       = softmax([a_1..a_L, a_1..a_P])                         (one softmax over L + P entries)
              (then dropout with probability ``attn_drop`` when it is > 0)
    out[n]  = sum_{valid z} (w_z + <qn, learnable_tokens[h, :, z]> + learnable_bias[h, 0, z]) * v[nbr(n, z)]
            + sum_m w_m * v_pool[m]

Note the learnable-token term uses ``qn`` (no query embedding, no scale). Neighbour order ``z = ki*K + kj``
(row-major, as ``F.unfold``). Out-of-grid neighbours contribute nothing (zero-padded values) and get ``-inf`` logits.

Triton path (``impl='triton'`` or ``METAMIXER_OPS_IMPL=triton``; ``auto`` on CUDA
tensors): fp32/fp16/bf16 activations (any strides, e.g. the model's head-split views), parameters of any
float dtype, any B/h/H/W/d/P, odd ``K``, no attention dropout (``attn_drop > 0`` and float64 take the reference).
fp32 accumulation; the pooled products run on tensor cores in the activation dtype (exact fp32 for fp32 inputs).
  * forward, one program per tile of query pixels of one (batch, head): normalise q, the scale from the analytic
    count of in-image neighbours; K*K local logits by gather + rpb (-inf outside the grid); pooled logits by one
    ``tl.dot`` against the normalised pooled keys (padded to a power of two >= 16) + pool bias; one softmax over
    both in registers; output = local gather-sum of (weight + learnable-token term) * v + ``tl.dot(w_pool, v_pool)``.
    Scores never reach memory; only the output and the per-pixel logsumexp are written.
  * backward, query side (same tiling): recompute the weights from the logsumexp; dq; per-program partial sums
    for the pooled dk/dv, learnable tokens/bias, rpb, temperature and query embedding (summed afterwards:
    deterministic, no atomics); the pool-bias gradient per batch element (summed over the batch); the local logit
    gradients and weights (``(B*h, N, 16)`` fp32) for
  * backward, key side: local dk/dv of each pixel gathered from the queries whose window holds it (the mirrored
    window of a zero-padded K x K window).
Eager calls go through a ``torch.autograd.Function``; under ``torch.compile`` the same launchers are the custom ops
``metamixer::aggregated_attention`` (returns output and logsumexp) and ``metamixer::aggregated_attention_backward``
with the backward registered (opaque, no graph break). Autocast casts q/k/v/k_pool/v_pool to the autocast dtype.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import interpreting, resolve_impl, triton_available, register_op

__all__ = ["aggregated_attention", "aggregated_attention_reference", "window_valid_mask"]


def window_valid_mask(size: Tuple[int, int], window_size: int, device=None) -> torch.Tensor:
    """``(N, K*K)`` bool: True where neighbour ``z`` of query ``n`` lies inside the ``H x W`` grid."""
    ones = torch.ones(1, 1, *size, device=device)
    return F.unfold(ones, window_size, padding=window_size // 2)[0].transpose(0, 1) > 0


def _neighbours(x: torch.Tensor, size: Tuple[int, int], window_size: int) -> torch.Tensor:
    """``(B, h, N, d)`` tokens on an ``H x W`` grid -> ``(B, h, N, K*K, d)`` zero-padded window neighbours."""
    B, nh, N, d = x.shape
    x = x.transpose(-1, -2).reshape(B, nh * d, *size)
    x = F.unfold(x, window_size, padding=window_size // 2)  # (B, h*d*L, N), channel-major then window position
    return x.reshape(B, nh, d, window_size ** 2, N).permute(0, 1, 4, 3, 2)


def aggregated_attention_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        temperature: torch.Tensor,
        query_embedding: torch.Tensor,
        rpb_local: torch.Tensor,
        pool_bias: torch.Tensor,
        learnable_tokens: torch.Tensor,
        learnable_bias: torch.Tensor,
        size: Tuple[int, int],
        window_size: int = 3,
        attn_drop: float = 0.0,
        probs_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Aggregated attention, plain PyTorch (the definition; see the module docstring).

    Args:
        q, k, v: ``(B, h, N, d)`` queries and local keys/values (raw projections, not normalised), ``N = H*W``.
        k_pool, v_pool: ``(B, h, P, d)`` pooled keys/values (raw projections).
        temperature: ``(h, 1, 1)``, passed through softplus.
        query_embedding: ``(h, 1, d)``.
        rpb_local: ``(h, K*K)`` bias of each window position.
        pool_bias: ``(h, N, P)`` bias of each (query, pooled token) pair.
        learnable_tokens: ``(h, d, K*K)``; learnable_bias: ``(h, 1, K*K)``.
        size: ``(H, W)`` of the query grid.
        window_size: ``K`` (odd).
        attn_drop: dropout probability on the softmax weights (pass 0 in eval).
        probs_fn: applied to the softmax weights ``(B, h, N, K*K + P)`` before dropout (OFQ quantizes them:
            ``backbones.quant.attention``).

    Returns:
        ``(B, h, N, d)``.
    """
    if window_size % 2 != 1:
        raise ValueError(f"window_size must be odd, got {window_size}")
    B, nh, N, d = q.shape
    if N != size[0] * size[1]:
        raise ValueError(f"q has {N} tokens but size {tuple(size)} has {size[0] * size[1]}")
    num_local, num_pool = window_size ** 2, k_pool.shape[-2]

    valid = window_valid_mask(size, window_size, q.device)  # (N, L)
    seq_length_scale = torch.log(valid.sum(-1, keepdim=True).float() + num_pool).to(q.dtype)  # (N, 1)
    q_norm = F.normalize(q, dim=-1)
    q_scaled = (q_norm + query_embedding) * F.softplus(temperature) * seq_length_scale

    k_local = _neighbours(F.normalize(k, dim=-1), size, window_size)  # (B, h, N, L, d)
    v_local = _neighbours(v, size, window_size)
    attn_local = (q_scaled.unsqueeze(-2) @ k_local.transpose(-1, -2)).squeeze(-2) + rpb_local.unsqueeze(1)
    attn_local = attn_local.masked_fill(~valid, float("-inf"))
    attn_pool = q_scaled @ F.normalize(k_pool, dim=-1).transpose(-1, -2) + pool_bias

    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    if probs_fn is not None:
        attn = probs_fn(attn)
    if attn_drop > 0:
        attn = F.dropout(attn, attn_drop)
    w_local, w_pool = attn.split([num_local, num_pool], dim=-1)
    w_local = w_local + q_norm @ learnable_tokens + learnable_bias  # (B, h, N, L)
    return (w_local.unsqueeze(-2) @ v_local).squeeze(-2) + w_pool @ v_pool


def aggregated_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        temperature: torch.Tensor,
        query_embedding: torch.Tensor,
        rpb_local: torch.Tensor,
        pool_bias: torch.Tensor,
        learnable_tokens: torch.Tensor,
        learnable_bias: torch.Tensor,
        size: Tuple[int, int],
        window_size: int = 3,
        attn_drop: float = 0.0,
        impl: Optional[str] = None,
) -> torch.Tensor:
    """Dispatcher the models call: the fused Triton kernels when chosen (see the module doc), else the reference.

    ``auto`` takes the kernels on CUDA: H100, bf16, transnext_micro's shapes at batch 64
    (``benchmarks/bench_aggregated_attention.py``): forward+backward 3.1-3.7x the eager reference, 2.0-2.3x its
    torch.compile.
    """
    supported = _triton_supported(q, k, v, k_pool, v_pool, pool_bias, size, window_size, attn_drop)
    args = (q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias, learnable_tokens,
            learnable_bias, size, window_size, attn_drop)
    if resolve_impl(impl, q, supported, op="aggregated_attention", args=args) == "reference":
        return aggregated_attention_reference(
            q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias,
            learnable_tokens, learnable_bias, size, window_size, attn_drop)
    if torch.is_autocast_enabled(q.device.type):  # the reference's matmul operands, as autocast would cast them
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v, k_pool, v_pool = (t.to(dt) for t in (q, k, v, k_pool, v_pool))
    elif any(t.dtype != q.dtype for t in (k, v, k_pool, v_pool)):
        raise TypeError(f"aggregated_attention: q, k, v, k_pool, v_pool dtypes differ "
                        f"({[str(t.dtype) for t in (q, k, v, k_pool, v_pool)]})")
    args = (q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias, learnable_tokens,
            learnable_bias, int(size[0]), int(size[1]), window_size)
    with torch.autocast(q.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return torch.ops.metamixer.aggregated_attention(*args)[0]
        return _AggregatedAttentionFn.apply(*args)


# ---- Triton kernels --------------------------------------------------------------------------------------------
def _triton_supported(q, k, v, k_pool, v_pool, pool_bias, size, window_size, attn_drop) -> bool:
    if q.ndim != 4 or k_pool.ndim != 4:
        return False
    B, nh, N, d = q.shape
    P = k_pool.shape[-2]
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16) and window_size % 2 == 1 and attn_drop == 0
            and N == size[0] * size[1] and k.shape == v.shape == q.shape and P >= 1
            and k_pool.shape == v_pool.shape == (B, nh, P, d) and pool_bias.shape == (nh, N, P))


if triton_available():
    import triton
    import triton.language as tl

    INTERPRETING = tl.constexpr(interpreting())  # read when a kernel is compiled (a global constexpr)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
        """fp32 inputs: an exact fp32 product (as the fp32 reference computes); fp16/bf16: operands rounded to that
        dtype, fp32 accumulation. (Triton's interpreter multiplies bf16 operands wrongly, so there the rounded
        operands are multiplied in fp32: the same numbers.)"""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        elif INTERPRETING and DT == tl.bfloat16:
            return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(DT), b.to(DT))

    @triton.jit
    def _l2norm(x):
        """``max(|row|, 1e-12)`` of a (rows, BD) fp32 tile: F.normalize's denominator."""
        return tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)

    @triton.jit
    def _neighbour(n, nmask, H, W, z, K: tl.constexpr):
        """Flat index of window position ``z`` (row-major in K x K, centred) of pixels ``n``, and whether it is inside
        the grid. Position ``K*K-1-z`` is the mirrored offset: the pixels whose position ``z`` is ``n``."""
        i = n // W + (z // K - K // 2)
        j = n % W + (z % K - K // 2)
        return i * W + j, nmask & (i >= 0) & (i < H) & (j >= 0) & (j < W)

    @triton.jit
    def _query_state(Q, Temp, QE, b, h, n, nmask, d, dmask, H, W, P, sqb, sqh, sqn, sqd,
                     K: tl.constexpr, DT: tl.constexpr):
        """Pixels ``n`` of one (batch, head): |q| (clamped), qn, u = qn + query embedding, the query scale
        ``softplus(temperature) * s_n`` and ``s_n = log(#in-image neighbours + P)``. ``QE``: this head's row."""
        q = tl.load(Q + b * sqb + h * sqh + n[:, None] * sqn + d[None, :] * sqd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        qnorm = _l2norm(q)
        qn = q / qnorm[:, None]
        i = n // W
        j = n % W
        rows = tl.minimum(i + K // 2, H - 1) - tl.maximum(i - K // 2, 0) + 1
        cols = tl.minimum(j + K // 2, W - 1) - tl.maximum(j - K // 2, 0) + 1
        count = tl.maximum(rows * cols + P, 1)  # (pixels outside the grid can count <= 0; they get s_n = 0)
        s_n = tl.where(nmask, tl.log(count.to(tl.float32)).to(DT).to(tl.float32), 0.0)  # reference: cast to q's dtype
        t = tl.load(Temp + h).to(tl.float32)
        sp = tl.where(t > 20.0, t, tl.log(1.0 + tl.exp(t)))  # F.softplus (threshold 20)
        u = qn + tl.load(QE + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        return qnorm, qn, u, sp * s_n, s_n

    @triton.jit
    def _scores(qs, Kk, KP, RPB, PB, b, h, n, nmask, d, dmask, c, m, mmask, H, W,
                skb, skh, skn, skd, spb, sph, spn, spd, sbh, sbn, sbm,
                K: tl.constexpr, LP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, DT: tl.constexpr):
        """Logits of pixels ``n``: local (BN, LP), -inf outside the grid and in padding; pooled (BN, PP), -inf in
        padding; and the normalised pooled keys (PP, BD)."""
        L: tl.constexpr = K * K
        s_loc = tl.full((BN, LP), float("-inf"), tl.float32)
        for z in range(L):
            nb, ok = _neighbour(n, nmask, H, W, z, K)
            kk = tl.load(Kk + b * skb + h * skh + nb[:, None] * skn + d[None, :] * skd,
                         mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            a = tl.sum(qs * kk, axis=1) / _l2norm(kk) + tl.load(RPB + h * L + z).to(tl.float32)
            s_loc = tl.where(c[None, :] == z, tl.where(ok, a, float("-inf"))[:, None], s_loc)
        kp = tl.load(KP + b * spb + h * sph + m[:, None] * spn + d[None, :] * spd,
                     mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        kpn = kp / _l2norm(kp)[:, None]
        pb = tl.load(PB + h * sbh + n[:, None] * sbn + m[None, :] * sbm, mask=nmask[:, None] & mmask[None, :],
                     other=0.0).to(tl.float32)
        s_pool = tl.where(mmask[None, :], _dot(qs, tl.trans(kpn), IEEE, DT) + pb, float("-inf"))
        return s_loc, s_pool, kpn

    @triton.jit
    def _aa_fwd_kernel(Q, Kk, V, KP, VP, Temp, QE, RPB, PB, TOK, LB, Out, Lse, nh, H, W, D, P,
                       sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                       spb, sph, spn, spd, swb, swh, swn, swd, sbh, sbn, sbm, sob, soh, son, sod,
                       K: tl.constexpr, LP: tl.constexpr, PP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                       IEEE: tl.constexpr):
        """One program: BN query pixels of one (batch, head). Logits, softmax and weights stay in registers; only
        the output and the per-pixel logsumexp are written."""
        pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // nh).to(tl.int64)
        h = (pid_bh % nh).to(tl.int64)
        L: tl.constexpr = K * K
        DT: tl.constexpr = Out.dtype.element_ty
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < H * W
        d = tl.arange(0, BD)
        dmask = d < D
        c = tl.arange(0, LP)
        cmask = c < L
        m = tl.arange(0, PP)
        mmask = m < P
        qnorm, qn, u, scale, s_n = _query_state(Q, Temp, QE + h * D, b, h, n, nmask, d, dmask, H, W, P,
                                                sqb, sqh, sqn, sqd, K, DT)
        s_loc, s_pool, kpn = _scores(u * scale[:, None], Kk, KP, RPB, PB, b, h, n, nmask, d, dmask, c, m, mmask, H, W,
                                     skb, skh, skn, skd, spb, sph, spn, spd, sbh, sbn, sbm, K, LP, BN, IEEE, DT)
        mx = tl.maximum(tl.max(s_loc, axis=1), tl.max(s_pool, axis=1))  # one softmax over local + pooled
        p_loc = tl.exp(s_loc - mx[:, None])
        p_pool = tl.exp(s_pool - mx[:, None])
        denom = tl.sum(p_loc, axis=1) + tl.sum(p_pool, axis=1)
        tok = tl.load(TOK + h * D * L + d[:, None] * L + c[None, :], mask=dmask[:, None] & cmask[None, :],
                      other=0.0).to(tl.float32)
        lb = tl.load(LB + h * L + c, mask=cmask, other=0.0).to(tl.float32)
        cw = p_loc / denom[:, None] + _dot(qn, tok, IEEE, DT) + lb[None, :]  # local weights + learnable-token term
        vp = tl.load(VP + b * swb + h * swh + m[:, None] * swn + d[None, :] * swd,
                     mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = _dot(p_pool / denom[:, None], vp, IEEE, DT)
        for z in range(L):
            nb, ok = _neighbour(n, nmask, H, W, z, K)
            vv = tl.load(V + b * svb + h * svh + nb[:, None] * svn + d[None, :] * svd,
                         mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(tl.where(c[None, :] == z, cw, 0.0), axis=1)[:, None] * vv
        tl.store(Out + b * sob + h * soh + n[:, None] * son + d[None, :] * sod, acc.to(DT),
                 mask=nmask[:, None] & dmask[None, :])
        tl.store(Lse + pid_bh * H * W + n, mx + tl.log(denom), mask=nmask)

    @triton.jit
    def _aa_bwd_query_kernel(Q, Kk, V, KP, VP, Temp, QE, RPB, PB, TOK, LB, DO, Lse,
                             DQ, DA, CW, DPB, PKP, PVP, PTOK, PRPB, PLB, PQE, PTEMP, nh, H, W, D, P, NT,
                             sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                             spb, sph, spn, spd, swb, swh, swn, swd, sbh, sbn, sbm, sgb, sgh, sgn, sgd,
                             K: tl.constexpr, LP: tl.constexpr, PP: tl.constexpr, BN: tl.constexpr,
                             BD: tl.constexpr, IEEE: tl.constexpr):
        """Query side of the backward, one program per forward tile: recompute the weights from the logsumexp;
        write dq, the local logit gradients ``DA`` and local weights ``CW`` (for the key-side kernel), the pool-bias
        gradient of this batch element, and this program's partial sums of every shared gradient (summed after)."""
        pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // nh).to(tl.int64)
        h = (pid_bh % nh).to(tl.int64)
        L: tl.constexpr = K * K
        DT: tl.constexpr = DQ.dtype.element_ty
        N = H * W
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < N
        d = tl.arange(0, BD)
        dmask = d < D
        nd = nmask[:, None] & dmask[None, :]
        c = tl.arange(0, LP)
        cmask = c < L
        m = tl.arange(0, PP)
        mmask = m < P
        qnorm, qn, u, scale, s_n = _query_state(Q, Temp, QE + h * D, b, h, n, nmask, d, dmask, H, W, P,
                                                sqb, sqh, sqn, sqd, K, DT)
        qs = u * scale[:, None]
        s_loc, s_pool, kpn = _scores(qs, Kk, KP, RPB, PB, b, h, n, nmask, d, dmask, c, m, mmask, H, W,
                                     skb, skh, skn, skd, spb, sph, spn, spd, sbh, sbn, sbm, K, LP, BN, IEEE, DT)
        lse = tl.load(Lse + pid_bh * N + n, mask=nmask, other=0.0)
        w_loc = tl.where(nmask[:, None], tl.exp(s_loc - lse[:, None]), 0.0)
        w_pool = tl.where(nmask[:, None], tl.exp(s_pool - lse[:, None]), 0.0)
        do = tl.load(DO + b * sgb + h * sgh + n[:, None] * sgn + d[None, :] * sgd, mask=nd, other=0.0).to(tl.float32)
        dcl = tl.zeros((BN, LP), tl.float32)  # gradient of the local weights (incl. token term): <do, v[nbr]>
        for z in range(L):
            nb, ok = _neighbour(n, nmask, H, W, z, K)
            vv = tl.load(V + b * svb + h * svh + nb[:, None] * svn + d[None, :] * svd,
                         mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            dcl = tl.where(c[None, :] == z, tl.sum(do * vv, axis=1)[:, None], dcl)
        vp = tl.load(VP + b * swb + h * swh + m[:, None] * swn + d[None, :] * swd,
                     mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        dwp = _dot(do, tl.trans(vp), IEEE, DT)
        tok = tl.load(TOK + h * D * L + d[:, None] * L + c[None, :], mask=dmask[:, None] & cmask[None, :],
                      other=0.0).to(tl.float32)
        lb = tl.load(LB + h * L + c, mask=cmask, other=0.0).to(tl.float32)
        cw = w_loc + _dot(qn, tok, IEEE, DT) + lb[None, :]
        # softmax backward over local + pooled entries
        dsum = tl.sum(w_loc * dcl, axis=1) + tl.sum(w_pool * dwp, axis=1)
        da_loc = w_loc * (dcl - dsum[:, None])
        da_pool = w_pool * (dwp - dsum[:, None])
        dqs = _dot(da_pool, kpn, IEEE, DT)
        for z in range(L):
            nb, ok = _neighbour(n, nmask, H, W, z, K)
            kk = tl.load(Kk + b * skb + h * skh + nb[:, None] * skn + d[None, :] * skd,
                         mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            dqs += tl.sum(tl.where(c[None, :] == z, da_loc, 0.0), axis=1)[:, None] * (kk / _l2norm(kk)[:, None])
        nc = nmask[:, None] & cmask[None, :]
        tl.store(DA + (pid_bh * N + n)[:, None] * LP + c[None, :], da_loc, mask=nc)
        tl.store(CW + (pid_bh * N + n)[:, None] * LP + c[None, :], cw, mask=nc)
        tl.store(DPB + (pid_bh * N + n)[:, None] * P + m[None, :], da_pool, mask=nmask[:, None] & mmask[None, :])
        t = pid_bh * NT + pid_n  # this program's partial sums (padding rows/columns are zero or sliced off)
        dp = (m * BD)[:, None] + d[None, :]
        tl.store(PKP + t * PP * BD + dp, _dot(tl.trans(da_pool), qs, IEEE, DT))
        tl.store(PVP + t * PP * BD + dp, _dot(tl.trans(w_pool), do, IEEE, DT))
        tl.store(PTOK + t * BD * LP + (d * LP)[:, None] + c[None, :], _dot(tl.trans(qn), dcl, IEEE, DT))
        tl.store(PRPB + t * LP + c, tl.sum(da_loc, axis=0))
        tl.store(PLB + t * LP + c, tl.sum(dcl, axis=0))
        dqs_scaled = dqs * scale[:, None]
        tl.store(PQE + t * BD + d, tl.sum(dqs_scaled, axis=0))
        tl.store(PTEMP + t, tl.sum(s_n * tl.sum(dqs * u, axis=1), axis=0))  # d loss / d softplus(temperature)
        dqn = dqs_scaled + _dot(dcl, tl.trans(tok), IEEE, DT)
        proj = tl.where(qnorm > 1e-12, tl.sum(dqn * qn, axis=1), 0.0)  # F.normalize backward
        dq = (dqn - qn * proj[:, None]) / qnorm[:, None]
        tl.store(DQ + (pid_bh * N + n)[:, None] * D + d[None, :], dq.to(DT), mask=nd)

    @triton.jit
    def _aa_bwd_key_kernel(Q, Kk, Temp, QE, DO, DA, CW, DK, DV, nh, H, W, D, P,
                           sqb, sqh, sqn, sqd, skb, skh, skn, skd, sgb, sgh, sgn, sgd,
                           K: tl.constexpr, LP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """Key side: the local dk, dv of pixels ``x`` gathered from the queries whose window holds them (the
        mirrored window; deterministic, no atomics)."""
        pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // nh).to(tl.int64)
        h = (pid_bh % nh).to(tl.int64)
        L: tl.constexpr = K * K
        DT: tl.constexpr = DK.dtype.element_ty
        N = H * W
        x = pid_n * BN + tl.arange(0, BN)
        xmask = x < N
        d = tl.arange(0, BD)
        dmask = d < D
        xd = xmask[:, None] & dmask[None, :]
        acc_k = tl.zeros((BN, BD), tl.float32)
        acc_v = tl.zeros((BN, BD), tl.float32)
        for z in range(L):
            n, ok = _neighbour(x, xmask, H, W, L - 1 - z, K)  # the queries whose window position z is x
            qnorm, qn, u, scale, s_n = _query_state(Q, Temp, QE + h * D, b, h, n, ok, d, dmask, H, W, P,
                                                    sqb, sqh, sqn, sqd, K, DT)
            da = tl.load(DA + (pid_bh * N + n) * LP + z, mask=ok, other=0.0)
            cw = tl.load(CW + (pid_bh * N + n) * LP + z, mask=ok, other=0.0)
            do = tl.load(DO + b * sgb + h * sgh + n[:, None] * sgn + d[None, :] * sgd,
                         mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc_k += (da * scale)[:, None] * u
            acc_v += cw[:, None] * do
        kk = tl.load(Kk + b * skb + h * skh + x[:, None] * skn + d[None, :] * skd, mask=xd, other=0.0).to(tl.float32)
        knorm = _l2norm(kk)
        kn = kk / knorm[:, None]
        proj = tl.where(knorm > 1e-12, tl.sum(acc_k * kn, axis=1), 0.0)  # F.normalize backward
        out = (pid_bh * N + x)[:, None] * D + d[None, :]
        tl.store(DK + out, ((acc_k - kn * proj[:, None]) / knorm[:, None]).to(DT), mask=xd)
        tl.store(DV + out, acc_v.to(DT), mask=xd)

    def _blocks(N: int, D: int, P: int, K: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
        """(BN, BD, PP, LP): pixels per program and padded head dim / pooled tokens / window (tl.dot needs >= 16).
        32 pixels in fp32 (its exact products run on FMA units and hold more registers), else 64; with 8 warps
        ptxas (sm_90, offline) reports no register spills at TransNeXt's head dim 24 and 49 pooled tokens."""
        bn = 32 if dtype == torch.float32 else 64
        return (max(16, min(bn, triton.next_power_of_2(N))), max(16, triton.next_power_of_2(D)),
                max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(K * K)))

    def _params(temperature, query_embedding, rpb_local, learnable_tokens, learnable_bias):
        return [t.contiguous() for t in (temperature, query_embedding, rpb_local, learnable_tokens, learnable_bias)]

    def _launch_fwd(q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias,
                    learnable_tokens, learnable_bias, H: int, W: int, K: int) -> Tuple[torch.Tensor, torch.Tensor]:
        B, nh, N, D = q.shape
        P = k_pool.shape[2]
        out = q.new_empty(B, nh, N, D)
        lse = q.new_empty(B, nh, N, dtype=torch.float32)
        BN, BD, PP, LP = _blocks(N, D, P, K, q.dtype)
        temp, qe, rpb, tok, lb = _params(temperature, query_embedding, rpb_local, learnable_tokens, learnable_bias)
        _aa_fwd_kernel[(B * nh, triton.cdiv(N, BN))](
            q, k, v, k_pool, v_pool, temp, qe, rpb, pool_bias, tok, lb, out, lse, nh, H, W, D, P,
            *q.stride(), *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(), *pool_bias.stride(),
            *out.stride(), K=K, LP=LP, PP=PP, BN=BN, BD=BD, IEEE=q.dtype == torch.float32, num_warps=8)
        return out, lse

    def _normalize_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Gradient through ``F.normalize(x, dim=-1)`` (fp32), given the gradient of its output."""
        norm = x.float().norm(dim=-1, keepdim=True)
        xn = x.float() / norm.clamp_min(1e-12)
        proj = torch.where(norm > 1e-12, (grad * xn).sum(-1, keepdim=True), 0.0)
        return (grad - xn * proj) / norm.clamp_min(1e-12)

    def _launch_bwd(grad, q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias,
                    learnable_tokens, learnable_bias, lse, H: int, W: int, K: int) -> List[torch.Tensor]:
        B, nh, N, D = q.shape
        P, L = k_pool.shape[2], K * K
        BN, BD, PP, LP = _blocks(N, D, P, K, q.dtype)
        NT = triton.cdiv(N, BN)
        temp, qe, rpb, tok, lb = _params(temperature, query_embedding, rpb_local, learnable_tokens, learnable_bias)
        f32 = dict(device=q.device, dtype=torch.float32)
        dq, dk, dv = (q.new_empty(B, nh, N, D) for _ in range(3))
        da, cw = (torch.empty(B * nh, N, LP, **f32) for _ in range(2))
        dpb = torch.empty(B, nh, N, P, **f32)
        pkp, pvp = (torch.empty(B, nh, NT, PP, BD, **f32) for _ in range(2))
        ptok = torch.empty(B, nh, NT, BD, LP, **f32)
        prpb, plb = (torch.empty(B, nh, NT, LP, **f32) for _ in range(2))
        pqe = torch.empty(B, nh, NT, BD, **f32)
        ptemp = torch.empty(B, nh, NT, **f32)
        _aa_bwd_query_kernel[(B * nh, NT)](
            q, k, v, k_pool, v_pool, temp, qe, rpb, pool_bias, tok, lb, grad, lse,
            dq, da, cw, dpb, pkp, pvp, ptok, prpb, plb, pqe, ptemp, nh, H, W, D, P, NT,
            *q.stride(), *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(), *pool_bias.stride(),
            *grad.stride(), K=K, LP=LP, PP=PP, BN=BN, BD=BD, IEEE=q.dtype == torch.float32, num_warps=8)
        _aa_bwd_key_kernel[(B * nh, NT)](
            q, k, temp, qe, grad, da, cw, dk, dv, nh, H, W, D, P, *q.stride(), *k.stride(), *grad.stride(),
            K=K, LP=LP, BN=BN, BD=BD, num_warps=8)
        dk_pool = _normalize_backward(k_pool, pkp.sum(2)[..., :P, :D])
        dtemp = ptemp.sum((0, 2)) * torch.sigmoid(temperature.float().flatten())  # softplus' derivative
        return [dq, dk, dv, dk_pool.to(k_pool.dtype), pvp.sum(2)[..., :P, :D].to(v_pool.dtype),
                dtemp.view_as(temperature).to(temperature.dtype),
                pqe.sum((0, 2))[:, :D].view_as(query_embedding).to(query_embedding.dtype),
                prpb.sum((0, 2))[:, :L].view_as(rpb_local).to(rpb_local.dtype),
                dpb.sum(0).to(pool_bias.dtype),
                ptok.sum((0, 2))[:, :D, :L].view_as(learnable_tokens).to(learnable_tokens.dtype),
                plb.sum((0, 2))[:, :L].view_as(learnable_bias).to(learnable_bias.dtype)]

    # torch.compile path: opaque custom ops with the backward registered.
    @torch.library.custom_op("metamixer::aggregated_attention", mutates_args=())
    def _aa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               temperature: torch.Tensor, query_embedding: torch.Tensor, rpb_local: torch.Tensor,
               pool_bias: torch.Tensor, learnable_tokens: torch.Tensor, learnable_bias: torch.Tensor,
               height: int, width: int, window_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return _launch_fwd(q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias,
                           learnable_tokens, learnable_bias, height, width, window_size)

    @_aa_op.register_fake
    def _(q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias, learnable_tokens,
          learnable_bias, height, width, window_size):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.custom_op("metamixer::aggregated_attention_backward", mutates_args=())
    def _aa_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                   v_pool: torch.Tensor, temperature: torch.Tensor, query_embedding: torch.Tensor,
                   rpb_local: torch.Tensor, pool_bias: torch.Tensor, learnable_tokens: torch.Tensor,
                   learnable_bias: torch.Tensor, lse: torch.Tensor, height: int, width: int,
                   window_size: int) -> List[torch.Tensor]:
        return _launch_bwd(grad, q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias,
                           learnable_tokens, learnable_bias, lse, height, width, window_size)

    @_aa_bwd_op.register_fake
    def _(grad, q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias, learnable_tokens,
          learnable_bias, lse, height, width, window_size):
        return [t.new_empty(t.shape) for t in (q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local,
                                               pool_bias, learnable_tokens, learnable_bias)]

    def _setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*inputs[:11], output[1])
        ctx.size_args = inputs[11:]

    def _backward(ctx, grad, grad_lse):
        grads = _aa_bwd_op(grad, *ctx.saved_tensors, *ctx.size_args)
        return (*grads, None, None, None)

    _aa_op.register_autograd(_backward, setup_context=_setup)

    class _AggregatedAttentionFn(torch.autograd.Function):
        """Eager path: the same launchers without the custom op's per-call dispatch overhead."""

        @staticmethod
        def forward(ctx, *args):
            out, lse = _launch_fwd(*args)
            ctx.save_for_backward(*args[:11], lse)
            ctx.size_args = args[11:]
            return out

        @staticmethod
        def backward(ctx, grad):
            return (*_launch_bwd(grad, *ctx.saved_tensors, *ctx.size_args), None, None, None)

register_op("aggregated_attention", aggregated_attention)
