"""Configuration exploration for the dwconv2d forward kernels (GPU), bf16 channels-last.

PYTHONPATH=. python benchmarks/tune_dwconv.py [--quick]   -- prints us per (shape, kernel, config) and cuDNN's
time, the numbers behind ``_seg_config`` / ``_blocks`` in ops/dwconv.py. Every config's output is checked against
cuDNN first (a wrong config prints ERR).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, time_ms  # noqa: E402

import ops.dwconv as D  # noqa: E402

# (B, C, H, W, k, dilation): ffnet_t / van_b0 stages at 224 and the B64 C64 56x56
SHAPES = [(64, 64, 56, 56, 7, 1), (64, 64, 56, 56, 5, 1), (64, 64, 56, 56, 3, 1), (64, 64, 56, 56, 9, 1),
          (64, 64, 56, 56, 7, 3), (64, 32, 56, 56, 7, 3), (64, 64, 28, 28, 7, 3), (64, 160, 14, 14, 7, 3),
          (64, 256, 7, 7, 7, 3), (64, 192, 28, 28, 7, 1), (64, 384, 14, 14, 7, 1), (64, 32, 56, 56, 5, 1)]
SEGS = [(7, 4, 8), (7, 2, 8), (7, 4, 4), (7, 2, 4), (8, 4, 4), (4, 4, 4)]
# (pixels per thread, num_warps, channels per thread)


def main():
    quick = "--quick" in sys.argv
    print(device_name())
    for B, C, H, W, k, dil in SHAPES[:5] if quick else SHAPES:
        x = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.randn(C, 1, k, k, device="cuda", dtype=torch.bfloat16)
        pad = dil * (k - 1) // 2
        ref = F.conv2d(x, w, None, 1, pad, dil, C)
        row = [f"cudnn {time_ms(lambda: F.conv2d(x, w, None, 1, pad, dil, C)) * 1e3:.1f}",
               f"tap {time_ms(lambda: D._launch_fwd(x, w, None, dil, seg_cfg=False)) * 1e3:.1f}"]
        for seg, nw, vec in SEGS:
            bc = min(64, C)
            cfg = (seg, bc, nw, vec)
            try:
                y = D._launch_seg(x, w, None, dil, False, cfg)
                err = (y.float() - ref.float()).abs().max().item()
                t = time_ms(lambda: D._launch_seg(x, w, None, dil, False, cfg)) * 1e3
                row.append(f"seg{seg}/w{nw}/v{vec} {t:.1f}" + (" ERR" if err > 0.25 else ""))
            except Exception as e:  # a config that does not compile (e.g. registers) is reported, not fatal
                row.append(f"seg{seg}/w{nw}/v{vec} fail {type(e).__name__}")
        g = torch.randn_like(x)
        cfg = D._seg_config(x, k, dil)
        row.append(f"weight grad: tap {time_ms(lambda: D._launch_bwd_w(x, g, k, dil, False, seg_cfg=False)) * 1e3:.1f}")
        if cfg:
            row.append(f"seg {time_ms(lambda: D._launch_bwd_w(x, g, k, dil, False)) * 1e3:.1f}")
        print(f"B{B} C{C} {H}x{W} k{k} d{dil}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
