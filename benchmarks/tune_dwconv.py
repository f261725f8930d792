"""Configuration exploration for the dwconv2d forward kernels (GPU), bf16 channels-last.

PYTHONPATH=. python benchmarks/tune_dwconv.py [--quick] -- prints us per (shape, kernel, config) and cuDNN's time,
the numbers behind ``_row_config`` / ``_seg_config`` / ``_blocks`` in ops/dwconv.py. Every config's output is
checked against cuDNN first (a wrong config prints ERR).
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
ROWS = [(32, 1, 4), (32, 1, 2), (16, 1, 4), (32, 2, 2), (64, 2, 2)]  # whole-row: (BLOCK_C, num_warps, channels/thread)


def main():
    quick = "--quick" in sys.argv
    print(device_name())
    for B, C, H, W, k, dil in SHAPES[:5] if quick else SHAPES:
        x = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.randn(C, 1, k, k, device="cuda", dtype=torch.bfloat16)
        pad = dil * (k - 1) // 2
        ref = F.conv2d(x, w, None, 1, pad, dil, C)
        row = [f"cudnn {time_ms(lambda: F.conv2d(x, w, None, 1, pad, dil, C)) * 1e3:.1f}",
               f"tap {time_ms(lambda: D._launch_fwd(x, w, None, dil, cfg=False)) * 1e3:.1f}"]
        cfgs = [(f"seg{seg}/w{nw}/v{vec}", (seg, min(64, C), nw, vec)) for seg, nw, vec in SEGS]
        cfgs += [(f"row{bc}/w{nw}/v{vec}", (bc, nw, vec)) for bc, nw, vec in ROWS if C % bc == 0]
        for label, cfg in cfgs:
            try:
                y = D._launch_fwd(x, w, None, dil, cfg=cfg)
                err = (y.float() - ref.float()).abs().max().item()
                t = time_ms(lambda: D._launch_fwd(x, w, None, dil, cfg=cfg)) * 1e3
                row.append(f"{label} {t:.1f}" + (" ERR" if err > 0.25 else ""))
            except Exception as e:  # a config that does not compile (e.g. registers) is reported, not fatal
                row.append(f"{label} fail {type(e).__name__}")
        g = torch.randn_like(x)
        cfg = D._row_config(x, k, dil) or D._seg_config(x, k, dil)
        row.append(f"weight grad: tap {time_ms(lambda: D._launch_bwd_w(x, g, k, dil, False, cfg=False)) * 1e3:.1f}")
        if cfg:
            kind = "row" if len(cfg) == 3 else "seg"
            row.append(f"{kind} {time_ms(lambda: D._launch_bwd_w(x, g, k, dil, False)) * 1e3:.1f}")
        print(f"B{B} C{C} {H}x{W} k{k} d{dil}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
