"""TransNeXt aggregated attention (issue 12): the fused Triton kernels vs the eager reference and its torch.compile.

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_aggregated_attention.py [--skip-compile] [--dtype bf16|fp32]
Shapes: what transnext_micro produces at 224 input, batch 64 (stages 1-3; stage 4 is full attention): 56x56 / 28x28
/ 14x14 query grids, 2 / 4 / 8 heads of 24 channels, a 3x3 window and 7x7 = 49 pooled tokens; all 11 tensor
arguments in the benchmark dtype. Tables: times in us, forward and forward+backward (gradients of all 11 arguments),
ours vs the eager reference and torch.compile of it; achieved GB/s of the forward (every input read once, output
and logsumexp written once) as % of the copy bandwidth measured in the same run; relative error of the forward vs
the fp64 reference.

Official CUDA baseline: where the authors' extension (``swattention``, TransNeXt's ``swattention_extension/``, fp32
and fp16 only) is importable, an "official" column times the official model's structure with its kernels (windowed
q.k + rpb and the window aggregation in CUDA, the rest in PyTorch). Build it on the GPU machine from a copy of that
folder: ``TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace``, then put the folder on PYTHONPATH, and run
with ``--dtype fp16`` or ``fp32``. With torch 2.11 the ``.cu`` files first need ``AT_DISPATCH_...(x.type(), ...)``
changed to ``x.scalar_type()`` (``sed -i 's/\.type(),/.scalar_type(),/' *.cu``): the deprecated overload is gone.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import copy_bandwidth_gbs, device_name, fwd_bwd, print_table, time_ms, try_time_ms, us  # noqa: E402

from ops.aggregated_attention import (  # noqa: E402
    aggregated_attention, aggregated_attention_reference, window_valid_mask)

try:
    import swattention  # the authors' CUDA extension, built separately (module doc)
except ImportError:
    swattention = None

# (label, B, heads, H, W, head_dim, pooled tokens): transnext_micro at 224, batch 64
SHAPES = [("micro s1 56x56", 64, 2, 56, 56, 24, 49), ("micro s2 28x28", 64, 4, 28, 28, 24, 49),
          ("micro s3 14x14", 64, 8, 14, 14, 24, 49)]
WINDOW = 3
DEVICE = "cuda"
COLS = ["shape", "fwd us", "ref fwd", "compile fwd", "x ref", "x compile", "GB/s", "% copy bw", "f+b us",
        "ref f+b", "compile f+b", "x ref f+b", "x compile f+b", "rel err", "official fwd", "official f+b",
        "x official f+b", "official rel err"]
_SW_THREADS = 128  # the official model's CUDA_NUM_THREADS


class _SwLocalLogits(torch.autograd.Function):
    """swattention's windowed q.k + rpb (-inf outside the image) with its backward."""
    @staticmethod
    def forward(ctx, q, k, rpb, H, W, K):
        ctx.save_for_backward(q, k)
        ctx.dims = (H, W, K)
        return swattention.qk_rpb_forward(q, k, rpb, H, W, K, _SW_THREADS)

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        dq, dk, drpb = swattention.qk_rpb_backward(grad.contiguous(), q, k, *ctx.dims, _SW_THREADS)
        return dq, dk, drpb, None, None, None


class _SwLocalSum(torch.autograd.Function):
    """swattention's window aggregation sum_z w[n, z] v[nbr(n, z)] with its backward."""
    @staticmethod
    def forward(ctx, w, v, H, W, K):
        ctx.save_for_backward(w, v)
        ctx.dims = (H, W, K)
        return swattention.av_forward(w, v, H, W, K, _SW_THREADS)

    @staticmethod
    def backward(ctx, grad):
        w, v = ctx.saved_tensors
        dw, dv = swattention.av_backward(grad.contiguous(), w, v, *ctx.dims, _SW_THREADS)
        return dw, dv, None, None, None


def official_cuda(q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias, learnable_tokens,
                  learnable_bias, size, window):
    """The op's semantics computed the way the official CUDA model does: its two kernels for the local window,
    PyTorch for normalisation, the pooled logits, the softmax and the pooled sum."""
    H, W = size
    P = k_pool.shape[-2]
    counts = window_valid_mask(size, window, q.device).sum(-1, keepdim=True).float()
    q_norm = F.normalize(q, dim=-1)
    q_scaled = (q_norm + query_embedding) * F.softplus(temperature) * torch.log(counts + P).to(q.dtype)
    local = _SwLocalLogits.apply(q_scaled.contiguous(), F.normalize(k, dim=-1).contiguous(), rpb_local, H, W, window)
    pooled = q_scaled @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + pool_bias
    w_local, w_pool = torch.cat([local, pooled], -1).softmax(-1).split([window * window, P], -1)
    w_local = q_norm @ learnable_tokens + learnable_bias + w_local
    return _SwLocalSum.apply(w_local.type_as(v).contiguous(), v.contiguous(), H, W, window) + w_pool @ v_pool


def _inputs(B, nh, H, W, d, P, dtype):
    """All 11 tensor arguments in ``dtype``; q/k/v and the pooled k/v as the model's head-split views."""
    N, L = H * W, WINDOW * WINDOW

    def heads(n):
        return torch.randn(B, n, nh * d, device=DEVICE, dtype=dtype).view(B, n, nh, d).transpose(1, 2)

    params = [torch.randn(nh, 1, 1), torch.randn(nh, 1, d) * 0.1, torch.randn(nh, L) * 0.1,
              torch.randn(nh, N, P) * 0.1, torch.randn(nh, d, L) * 0.1, torch.randn(nh, 1, L) * 0.1]
    return [heads(N), heads(N), heads(N), heads(P), heads(P)] + [t.to(DEVICE, dtype) for t in params]


def bench(label, B, nh, H, W, d, P, dtype, bw, compile_ok):
    size = (H, W)
    inputs = _inputs(B, nh, H, W, d, P, dtype)
    ours = lambda *a: aggregated_attention(*a, size, WINDOW, impl="triton")  # noqa: E731
    ref = lambda *a: aggregated_attention_reference(*a, size, WINDOW)  # noqa: E731
    comp = torch.compile(ref, dynamic=False) if compile_ok else None
    t = us(time_ms(lambda: ours(*inputs)))
    tr = us(time_ms(lambda: ref(*inputs)))
    tc = us(try_time_ms(lambda: comp(*inputs))) if comp else None
    fb = [x.detach().clone().requires_grad_() for x in inputs]
    g = torch.randn_like(inputs[0])
    tb = us(time_ms(fwd_bwd(ours, fb, g)))
    tbr = us(time_ms(fwd_bwd(ref, fb, g)))
    tbc = us(try_time_ms(fwd_bwd(comp, fb, g))) if comp else None
    out_bytes = B * nh * H * W * (d * inputs[0].element_size() + 4)  # output + fp32 logsumexp
    gbs = (sum(x.numel() * x.element_size() for x in inputs) + out_bytes) / (t * 1e-6) / 1e9
    exact = aggregated_attention_reference(*[x.double() for x in inputs], size, WINDOW)
    err = ((ours(*inputs).double() - exact).norm() / exact.norm()).item()
    off = {}
    if swattention is not None and dtype != torch.bfloat16:  # the extension has fp32 and fp16 kernels only
        official = lambda *a: official_cuda(*a, size, WINDOW)  # noqa: E731
        tbo = us(time_ms(fwd_bwd(official, fb, g)))
        off = {"official fwd": us(time_ms(lambda: official(*inputs))), "official f+b": tbo,
               "x official f+b": tbo / tb,
               "official rel err": f"{((official(*inputs).double() - exact).norm() / exact.norm()).item():.1e}"}
    return {**off, "shape": label, "fwd us": t, "ref fwd": tr, "compile fwd": tc, "x ref": tr / t,
            "x compile": tc / t if tc else None, "GB/s": gbs, "% copy bw": 100 * gbs / bw, "f+b us": tb,
            "ref f+b": tbr, "compile f+b": tbc, "x ref f+b": tbr / tb, "x compile f+b": tbc / tb if tbc else None,
            "rel err": f"{err:.1e}"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print("official CUDA extension (swattention):", "found" if swattention is not None else "not importable")
    print(device_name())
    bw = copy_bandwidth_gbs()
    print(f"copy bandwidth: {bw:.0f} GB/s")
    rows = []
    for shape in SHAPES:
        rows.append(bench(*shape, dtype, bw, not args.skip_compile))
        print(rows[-1], flush=True)
    print_table(rows, COLS, f"aggregated_attention (3x3 window + 49 pooled tokens), {args.dtype}")


if __name__ == "__main__":
    main()
