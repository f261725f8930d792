"""Tile-shape exploration for the dwconv2d forward kernel and timing of the weight-gradient kernel (GPU).

PYTHONPATH=. python benchmarks/tune_dwconv.py   -- prints us per (shape, tile config); used to choose the
autotune config list in ops/dwconv.py.
"""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, time_ms  # noqa: E402

import ops.dwconv as D  # noqa: E402

raw = getattr(D._dwconv_fwd_kernel, "fn", D._dwconv_fwd_kernel)
SHAPES = [(64, 64, 56, 56, 3, 1), (64, 64, 56, 56, 7, 1), (64, 64, 56, 56, 13, 1), (64, 80, 56, 56, 3, 1)]
CFGS = [(64, 4, 8, 4), (64, 8, 8, 4), (64, 2, 8, 2), (16, 8, 16, 4)]
print(device_name())
# per-call overhead (launch-bound tiny input): dispatcher+custom_op vs the raw launch vs cuDNN
xt = torch.randn(1, 8, 8, 8, device="cuda", dtype=torch.bfloat16)
wt = torch.randn(8, 1, 3, 3, device="cuda", dtype=torch.bfloat16)
print("overhead us: dispatcher %.1f, raw launch %.1f, F.conv2d %.1f" % (
    time_ms(lambda: D.dwconv2d(xt, wt, None, 1, 1, 1, impl="triton")) * 1e3,
    time_ms(lambda: D._launch_fwd(xt, wt, None, 1)) * 1e3,
    time_ms(lambda: D.dwconv2d_reference(xt, wt, None, 1, 1, 1)) * 1e3))
for B, C, H, W, k, dil in SHAPES:
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    res = []
    for bc, bh, bw, nw in CFGS:
        grid = (triton.cdiv(H, bh) * triton.cdiv(W, bw), triton.cdiv(C, bc), B)

        def run():
            raw[grid](x, w, w, y, C, H, W, *x.stride(), *y.stride(), K=k, DIL=dil, HAS_BIAS=False,
                      EVEN_C=C % bc == 0, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=nw)
        res.append((time_ms(run) * 1e3, (bc, bh, bw, nw)))
    res.sort()
    g = torch.randn_like(x)
    t_bw = time_ms(lambda: D._launch_bwd_w(x, g, k, dil)) * 1e3
    t_auto = time_ms(lambda: D._launch_fwd(x, w, None, dil)) * 1e3
    print(f"B{B} C{C} {H}x{W} k{k} d{dil}: autotuned fwd {t_auto:.1f} us; best fixed "
          + ", ".join(f"{t:.1f}us {c}" for t, c in res[:4]) + f"; worst {res[-1][0]:.1f}us {res[-1][1]}"
          + f"; bwd_w {t_bw:.1f} us")
