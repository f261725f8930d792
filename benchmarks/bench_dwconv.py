"""dwconv2d benchmark: Triton vs cuDNN (the reference is F.conv2d with groups=C) vs torch.compile of the reference.

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_dwconv.py [--quick]
Prints: shape, dtype, layout, times (us) forward and forward+backward, our speed-up over cuDNN and compile, and our
achieved GB/s (forward: input read once + output written once) as % of the copy bandwidth measured in the same run.
"graph fwd" / "graph f+b" replay the forward / forward+backward from a CUDA graph: GPU time without the
Python/launch overhead, which dominates the plain (wall) times at small shapes.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import copy_bandwidth_gbs, device_name, graph_time_ms, print_table, time_ms, try_time_ms  # noqa: E402

from ops import dwconv2d, dwconv2d_reference  # noqa: E402

# (label, B, C, H, W, k, dilation): the depthwise convs the models produce at 224 input, batch 64, plus a sweep
MODEL_SHAPES = [
    ("ffnet_t s0 3x3", 64, 80, 56, 56, 3, 1),
    ("ffnet_t s2 7x7", 64, 320, 14, 14, 7, 1),
    ("ffnet_t s3 7x7", 64, 640, 7, 7, 7, 1),
    ("van_b0 s0 5x5", 64, 32, 56, 56, 5, 1),
    ("van_b0 s0 7x7 d3", 64, 32, 56, 56, 7, 3),
    ("van_b0 s1 7x7 d3", 64, 64, 28, 28, 7, 3),
    ("van_b0 s2 7x7 d3", 64, 160, 14, 14, 7, 3),
    ("van_b0 s3 7x7 d3", 64, 256, 7, 7, 7, 3),
    ("van_b0 s1 5x5", 64, 64, 28, 28, 5, 1),
    ("van_b0 s0 mlp 3x3", 64, 256, 56, 56, 3, 1),
    ("van_b0 s2 mlp 3x3", 64, 1280, 14, 14, 3, 1),
    ("B64 C64 56 7x7 d3", 64, 64, 56, 56, 7, 3),
    # ffnet_t's stage transitions: stride 2, channel multiplier 2 (C -> 2C), a 7x7 and a 3x3 branch
    ("ffnet_t down1 7x7 s2 x2", 64, 80, 56, 56, 7, 1, 2, 2),
    ("ffnet_t down1 3x3 s2 x2", 64, 80, 56, 56, 3, 1, 2, 2),
    ("ffnet_t down3 7x7 s2 x2", 64, 320, 14, 14, 7, 1, 2, 2),
]
SWEEP = [("B64 C64 56 k%d" % k, 64, 64, 56, 56, k, 1) for k in (3, 5, 7, 9, 13, 17, 21, 25, 31)]


def bench(label, B, C, H, W, k, dil, dtype, cl, bw_gbs, compiled, stride=1, mult=1):
    x = torch.randn(B, C, H, W, device="cuda", dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C * mult, 1, k, k, device="cuda", dtype=dtype)
    b = torch.randn(C * mult, device="cuda", dtype=dtype)
    pad, s = dil * (k - 1) // 2, stride
    ours = lambda: dwconv2d(x, w, b, s, pad, dil, impl="triton")  # noqa: E731
    ref = lambda: dwconv2d_reference(x, w, b, s, pad, dil)  # noqa: E731
    comp = lambda: compiled(x, w, b, s, pad, dil)  # noqa: E731
    err = ((ours().float() - ref().float()).norm() / ref().float().norm()).item()
    t_ours, t_ref = time_ms(ours) * 1e3, time_ms(ref) * 1e3
    t_comp = try_time_ms(comp) if compiled else None
    t_comp = t_comp * 1e3 if t_comp is not None else None
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    g = torch.randn_like(ref())

    def fb(fn):
        def run():
            out = fn(xs, ws, bs, s, pad, dil)
            torch.autograd.grad(out, (xs, ws, bs), g)
        return run

    tb_ours = time_ms(fb(lambda *a: dwconv2d(*a, impl="triton"))) * 1e3
    tb_ref = time_ms(fb(dwconv2d_reference)) * 1e3
    tb_comp = try_time_ms(fb(compiled)) if compiled else None
    tg_ours, tg_ref = graph_time_ms(fb(lambda *a: dwconv2d(*a, impl="triton"))), graph_time_ms(fb(dwconv2d_reference))
    tgf_ours, tgf_ref = graph_time_ms(ours), graph_time_ms(ref)
    tb_comp = tb_comp * 1e3 if tb_comp is not None else None
    gbs = 2 * x.numel() * x.element_size() / (t_ours * 1e-6) / 1e9
    return {
        "shape": label, "dtype": str(dtype).split(".")[-1], "layout": "NHWC" if cl else "NCHW",
        "fwd us": t_ours, "cuDNN fwd": t_ref, "compile fwd": t_comp, "x cuDNN": t_ref / t_ours,
        "x compile": (t_comp / t_ours) if t_comp else None, "GB/s": gbs, "% copy bw": 100 * gbs / bw_gbs,
        "fwd+bwd us": tb_ours, "cuDNN f+b": tb_ref, "compile f+b": tb_comp, "x cuDNN f+b": tb_ref / tb_ours,
        "graph fwd us": tgf_ours and tgf_ours * 1e3, "cuDNN graph fwd": tgf_ref and tgf_ref * 1e3,
        "x cuDNN graph fwd": (tgf_ref / tgf_ours) if tgf_ours and tgf_ref else None,
        "graph f+b us": tg_ours and tg_ours * 1e3, "cuDNN graph f+b": tg_ref and tg_ref * 1e3,
        "x cuDNN graph f+b": (tg_ref / tg_ours) if tg_ours and tg_ref else None,
        "rel err": f"{err:.1e}",
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="bf16 channels-last only")
    ap.add_argument("--no-sweep", action="store_true", help="only the shapes the models produce")
    ap.add_argument("--skip-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    torch._dynamo.config.recompile_limit = 1024  # one compiled graph per shape, never a silent eager fallback
    torch._dynamo.config.accumulated_recompile_limit = 4096
    bw = copy_bandwidth_gbs()
    print(f"device: {device_name()}; copy bandwidth (read+write): {bw:.0f} GB/s")
    compiled = None if args.skip_compile else torch.compile(dwconv2d_reference, dynamic=False)
    cols = ["shape", "dtype", "layout", "fwd us", "cuDNN fwd", "compile fwd", "x cuDNN", "x compile", "GB/s",
            "% copy bw", "graph fwd us", "cuDNN graph fwd", "x cuDNN graph fwd", "fwd+bwd us", "cuDNN f+b", "compile f+b",
            "x cuDNN f+b", "graph f+b us", "cuDNN graph f+b", "x cuDNN graph f+b", "rel err"]
    configs = [(torch.bfloat16, True)] if args.quick else [(torch.bfloat16, True), (torch.bfloat16, False),
                                                           (torch.float32, True)]
    for dtype, cl in configs:
        rows = [bench(*s[:7], dtype, cl, bw, compiled, *s[7:]) for s in MODEL_SHAPES + ([] if args.no_sweep else SWEEP)]
        print_table(rows, cols, f"dwconv2d, {str(dtype).split('.')[-1]}, {'channels-last' if cl else 'NCHW'}")


if __name__ == "__main__":
    main()
