"""mix_shift (MS-MLP) and fused LKA (VAN) benchmark: Triton path vs the eager reference vs torch.compile of it.

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_mix_shift_lka.py [--quick]
Shapes: those msmlp_t and van_b0 produce at 224 input, batch 64 (plus VAN's B64 C64 56x56). Prints per table:
times (us) forward and forward+backward, our speed-up over the eager reference and over torch.compile of it, and
our achieved GB/s (forward: input read once + output written once) as % of the copy bandwidth measured in the same
run. The LKA table also times an unfused Triton variant (Triton depthwise convs, then cuDNN's 1x1 conv and an eager
gate product) to show what fusing the gate into the 1x1 GEMM buys.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import copy_bandwidth_gbs, device_name, graph_time_ms, print_table, time_ms, try_time_ms, us  # noqa: E402

from ops.dwconv import dwconv2d  # noqa: E402
from ops.lka import lka, lka_reference  # noqa: E402
from ops.mix_shift import mix_shift, mix_shift_chunk_sizes, mix_shift_reference  # noqa: E402

SHIFTS = (-2, -1, 0, 1, 2)
# msmlp_t at 224, batch 64: (label, B, C, H, W, kernel size per group); both directions use the same sizes
MIX_SHIFT_SHAPES = [
    ("msmlp_t s0", 64, 96, 56, 56, (1, 1, 3, 5, 7)),
    ("msmlp_t s1", 64, 192, 28, 28, (1, 3, 3, 5, 7)),
    ("msmlp_t s2", 64, 384, 14, 14, (1, 5, 5, 5, 7)),
    ("msmlp_t s3", 64, 768, 7, 7, (1, 7, 7, 7, 7)),
]
# van_b0 at 224, batch 64 (embed dims 32, 64, 160, 256), and the B64 C64 56x56
LKA_SHAPES = [
    ("van_b0 s0", 64, 32, 56, 56),
    ("van_b0 s1", 64, 64, 28, 28),
    ("van_b0 s2", 64, 160, 14, 14),
    ("van_b0 s3", 64, 256, 7, 7),
    ("B64 C64 56x56", 64, 64, 56, 56),
]
COLS = ["shape", "dtype", "layout", "fwd us", "ref fwd", "compile fwd", "x ref", "x compile", "GB/s", "% copy bw",
        "fwd+bwd us", "ref f+b", "compile f+b", "x ref f+b", "x compile f+b", "graph f+b us", "ref graph f+b",
        "x ref graph f+b", "rel err"]


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _fwd_bwd(fn, args):
    """A callable running fn(*args) forward and backward with respect to every floating-point tensor in args."""
    leaves = [a.detach().clone().requires_grad_() if torch.is_tensor(a) else a for a in args]
    grads_of = [a for a in leaves if torch.is_tensor(a)]
    g = torch.randn_like(fn(*args))

    def run():
        torch.autograd.grad(fn(*leaves), grads_of, g)
    return run


def _row(label, x, ours, ref, comp, args, bw_gbs, extra=None):
    out, want = ours(*args), ref(*args)
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    t, t_ref = us(time_ms(lambda: ours(*args))), us(time_ms(lambda: ref(*args)))
    t_comp = us(try_time_ms(lambda: comp(*args))) if comp else None
    tb, tb_ref = us(time_ms(_fwd_bwd(ours, args))), us(time_ms(_fwd_bwd(ref, args)))
    tb_comp = us(try_time_ms(_fwd_bwd(comp, args))) if comp else None
    # GPU time without host overhead (CUDA-graph replays): the wall f+b above is host-bound at small shapes
    tg, tg_ref = us(graph_time_ms(_fwd_bwd(ours, args))), us(graph_time_ms(_fwd_bwd(ref, args)))
    gbs = 2 * x.numel() * x.element_size() / (t * 1e-6) / 1e9
    row = {"shape": label, "dtype": str(x.dtype).split(".")[-1],
           "layout": "NHWC" if x.is_contiguous(memory_format=torch.channels_last) else "NCHW",
           "fwd us": t, "ref fwd": t_ref, "compile fwd": t_comp, "x ref": t_ref / t, "x compile": _ratio(t_comp, t),
           "GB/s": gbs, "% copy bw": 100 * gbs / bw_gbs, "fwd+bwd us": tb, "ref f+b": tb_ref, "compile f+b": tb_comp,
           "x ref f+b": tb_ref / tb, "x compile f+b": _ratio(tb_comp, tb), "graph f+b us": tg, "ref graph f+b": tg_ref,
           "x ref graph f+b": _ratio(tg_ref, tg), "rel err": f"{err:.1e}"}
    if extra:
        for name, fn in extra.items():
            row[name + " fwd"] = us(time_ms(lambda: fn(*args)))
            row[name + " f+b"] = us(time_ms(_fwd_bwd(fn, args)))
    return row


def _input(B, C, H, W, dtype, cl):
    x = torch.randn(B, C, H, W, device="cuda", dtype=dtype)
    return x.to(memory_format=torch.channels_last) if cl else x


def bench_mix_shift(label, B, C, H, W, ks, dtype, cl, bw, compiled):
    x = _input(B, C, H, W, dtype, cl)
    sizes = mix_shift_chunk_sizes(C, len(SHIFTS))
    ws = [torch.randn(c, 1, k, k, device="cuda", dtype=dtype) * k ** -1 for d in range(2) for c, k in zip(sizes, ks)]
    bs = [torch.randn(c, device="cuda", dtype=dtype) for d in range(2) for c in sizes]
    G = len(SHIFTS)

    def unpack(fn):  # flat tensor arguments (so _fwd_bwd sees them) -> the op's nested lists
        return lambda x, *p: fn(x, [p[:G], p[G:2 * G]], [p[2 * G:3 * G], p[3 * G:]], SHIFTS)
    ours = unpack(lambda *a: mix_shift(*a, impl="triton"))
    return _row(label, x, ours, unpack(mix_shift_reference), unpack(compiled) if compiled else None,
                [x, *ws, *bs], bw)


def _lka_unfused(x, w5, b5, w7, b7, w1, b1):
    a = dwconv2d(x, w5, b5, padding=2, impl="triton")
    a = dwconv2d(a, w7, b7, padding=9, dilation=3, impl="triton")
    return x * F.conv2d(a, w1, b1)


def bench_lka(label, B, C, H, W, dtype, cl, bw, compiled):
    x = _input(B, C, H, W, dtype, cl)

    def r(*shape, s=1.0):
        return torch.randn(*shape, device="cuda", dtype=dtype) * s
    args = [x, r(C, 1, 5, 5, s=0.2), r(C), r(C, 1, 7, 7, s=0.15), r(C), r(C, C, 1, 1, s=C ** -0.5), r(C)]
    return _row(label, x, lambda *a: lka(*a, impl="triton"), lka_reference, compiled, args, bw,
                extra={"unfused": _lka_unfused})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="bf16 channels-last only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    bw = copy_bandwidth_gbs()
    print(f"device: {device_name()}; copy bandwidth (read+write): {bw:.0f} GB/s")
    configs = [(torch.bfloat16, True)] if args.quick else [(torch.bfloat16, True), (torch.bfloat16, False),
                                                           (torch.float32, True)]
    for i, (dtype, cl) in enumerate(configs):
        # torch.compile baselines for the first configuration only (compiling every shape costs minutes)
        use_compile = i == 0 and not args.no_compile
        tag = f"{str(dtype).split('.')[-1]}, {'channels-last' if cl else 'NCHW'}"
        ms_comp = torch.compile(mix_shift_reference, dynamic=False) if use_compile else None
        rows = [bench_mix_shift(*s, dtype, cl, bw, ms_comp) for s in MIX_SHIFT_SHAPES]
        print_table(rows, COLS, f"mix_shift (msmlp_t, batch 64), {tag}")
        lka_comp = torch.compile(lka_reference, dynamic=False) if use_compile else None
        rows = [bench_lka(*s, dtype, cl, bw, lka_comp) for s in LKA_SHAPES]
        print_table(rows, COLS + ["unfused fwd", "unfused f+b"], f"LKA (van_b0, batch 64), {tag}")


if __name__ == "__main__":
    main()
