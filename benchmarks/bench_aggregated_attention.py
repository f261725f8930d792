"""TransNeXt aggregated attention (issue 12): the fused Triton kernels vs the eager reference and its torch.compile.

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_aggregated_attention.py [--skip-compile] [--dtype bf16|fp32]
Shapes: what transnext_micro produces at 224 input, batch 64 (stages 1-3; stage 4 is full attention): 56x56 / 28x28
/ 14x14 query grids, 2 / 4 / 8 heads of 24 channels, a 3x3 window and 7x7 = 49 pooled tokens; all 11 tensor
arguments in the benchmark dtype. Tables: times in us, forward and forward+backward (gradients of all 11 arguments),
ours vs the eager reference and torch.compile of it; achieved GB/s of the forward (every input read once, output
and logsumexp written once) as % of the copy bandwidth measured in the same run; relative error of the forward vs
the fp64 reference. The dispatcher's ``auto`` keeps the reference until this table shows the kernels faster
(``preferred=False`` in ops/aggregated_attention.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import copy_bandwidth_gbs, device_name, fwd_bwd, print_table, time_ms, try_time_ms, us  # noqa: E402

from ops.aggregated_attention import aggregated_attention, aggregated_attention_reference  # noqa: E402

# (label, B, heads, H, W, head_dim, pooled tokens): transnext_micro at 224, batch 64
SHAPES = [("micro s1 56x56", 64, 2, 56, 56, 24, 49), ("micro s2 28x28", 64, 4, 28, 28, 24, 49),
          ("micro s3 14x14", 64, 8, 14, 14, 24, 49)]
WINDOW = 3
DEVICE = "cuda"
COLS = ["shape", "fwd us", "ref fwd", "compile fwd", "x ref", "x compile", "GB/s", "% copy bw", "f+b us",
        "ref f+b", "compile f+b", "x ref f+b", "x compile f+b", "rel err"]


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
    return {"shape": label, "fwd us": t, "ref fwd": tr, "compile fwd": tc, "x ref": tr / t,
            "x compile": tc / t if tc else None, "GB/s": gbs, "% copy bw": 100 * gbs / bw, "f+b us": tb,
            "ref f+b": tbr, "compile f+b": tbc, "x ref f+b": tbr / tb, "x compile f+b": tbc / tb if tbc else None,
            "rel err": f"{err:.1e}"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
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
