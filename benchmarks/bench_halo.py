"""Halo attention (HaloNet, issue 12): the Triton kernels vs the eager reference and torch.compile of it.

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_halo.py [--skip-compile] [--model]
Shapes: every distinct halo_attention call of halo_h1 (= timm halonet_h1) at 256 input, batch 64, bf16, q and the
fused kv conv output channels-last as the model produces them under channels-last (k and v are views). Tables: times
in us (forward, and forward+backward), ours vs the eager reference and (forward+backward) torch.compile of the
reference, achieved GB/s of the forward (q, k, v read once, output written once) as % of the copy bandwidth measured
in the same run, forward+backward replayed from a CUDA graph (GPU time, no host overhead) for ours and the
reference, and the relative error vs the reference. A second table sweeps the kernels' ``q_chunk`` knob
(queries per program; None: the default rule of ``_meta`` in ops/halo_attention.py). ``--model`` also times
training steps of halo_h1 with METAMIXER_OPS_IMPL=triton vs =reference vs timm's halonet_h1 (256 input, batch 64,
bf16 autocast, channels-last).

``auto`` takes the kernels on CUDA; the model comparison through ``bench_models.py`` (reference vs auto):
    PYTHONPATH=. python benchmarks/bench_models.py halo_h1 timm:halonet_h1 --size 256 --batch 256
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    copy_bandwidth_gbs, device_name, fwd_bwd, graph_time_ms, print_table, rel_err, time_ms, try_time_ms, us)

from ops.halo_attention import _launch_bwd, _launch_fwd, halo_attention, halo_attention_reference  # noqa: E402

DT = torch.bfloat16
# (label, B, heads, dqk, dv, H, W of k/v, block, halo, query stride): halo_h1 at 256 (b=8, h=3, 8 heads, r_v=1);
# "/2" is a stage's first block (strided queries)
SHAPES = [
    ("s1 64x64", 64, 8, 8, 8, 64, 64, 8, 3, 1),
    ("s2 64x64 /2", 64, 8, 16, 16, 64, 64, 8, 3, 2),
    ("s2 32x32", 64, 8, 16, 16, 32, 32, 8, 3, 1),
    ("s3 32x32 /2", 64, 8, 32, 32, 32, 32, 8, 3, 2),
    ("s3 16x16", 64, 8, 32, 32, 16, 16, 8, 3, 1),
    ("s4 16x16 /2", 64, 8, 64, 64, 16, 16, 8, 3, 2),
    ("s4 8x8", 64, 8, 64, 64, 8, 8, 8, 3, 1),
]
CHUNKS = (None, 64, 32, 16)


def _inputs(B, nh, dqk, dv, H, W, block, halo, stride):
    cl = torch.channels_last
    win = block + 2 * halo
    q = torch.randn(B, nh * dqk, H // stride, W // stride, device="cuda", dtype=DT).to(memory_format=cl)
    kv = torch.randn(B, nh * (dqk + dv), H, W, device="cuda", dtype=DT).to(memory_format=cl)
    rel = torch.randn(2, 2 * win - 1, dqk, device="cuda", dtype=DT) * dqk ** -0.5
    return q.requires_grad_(), kv.requires_grad_(), rel.requires_grad_()


def _split(q, kv, nh, dqk, dv):
    k, v = kv.unflatten(1, (nh, -1)).split([dqk, dv], dim=2)
    return q.unflatten(1, (nh, dqk)), k, v


def bench_op(bw, compile_ok, chunks=CHUNKS):
    rows, sweep = [], []
    for label, B, nh, dqk, dv, H, W, block, halo, stride in SHAPES:
        inputs = _inputs(B, nh, dqk, dv, H, W, block, halo, stride)

        def call(q, kv, rel, impl, fn=halo_attention):
            return fn(*_split(q, kv, nh, dqk, dv), rel[0], rel[1], block, halo, stride, impl=impl)

        def ours(*a):
            return call(*a, "triton")

        def ref(*a):
            return call(*a, "reference")

        comp = None
        if compile_ok:
            compiled = torch.compile(halo_attention_reference, dynamic=False)

            def comp(q, kv, rel):
                return compiled(*_split(q, kv, nh, dqk, dv), rel[0], rel[1], block, halo, stride)

        with torch.no_grad():
            t, tr = us(time_ms(lambda: ours(*inputs))), us(time_ms(lambda: ref(*inputs)))
            err = rel_err(ours(*inputs), ref(*inputs))
        g = torch.randn_like(ref(*inputs))
        tb, tbr = us(time_ms(fwd_bwd(ours, inputs, g))), us(time_ms(fwd_bwd(ref, inputs, g)))
        tbc = us(try_time_ms(fwd_bwd(comp, inputs, g))) if comp else None
        # GPU time without host overhead (CUDA-graph replays): the wall f+b is host-bound at the small stages
        tg, tgr = (us(graph_time_ms(fwd_bwd(f, inputs, g))) for f in (ours, ref))
        io_bytes = sum(x.numel() * x.element_size() for x in inputs[:2]) + g.numel() * g.element_size()
        gbs = io_bytes / (t * 1e-6) / 1e9
        rows.append({"shape": label, "fwd us": t, "ref fwd": tr, "x ref": tr / t, "GB/s": gbs,
                     "% copy bw": 100 * gbs / bw, "f+b us": tb, "ref f+b": tbr, "compile f+b": tbc,
                     "x ref f+b": tbr / tb, "x compile f+b": tbc / tb if tbc else None, "graph f+b": tg,
                     "ref graph f+b": tgr, "x ref graph f+b": tgr / tg if tg and tgr else None, "rel err": err})
        print(rows[-1], flush=True)

        q, k, v = (x.detach() for x in _split(*inputs[:2], nh, dqk, dv))
        rh, rw = inputs[2].detach()
        scale = dqk ** -0.5
        row = {"shape": label}
        for c in chunks:
            out, lse = _launch_fwd(q, k, v, rh, rw, block, halo, stride, scale, c)
            row[f"fwd q_chunk={c}"] = us(time_ms(lambda: _launch_fwd(q, k, v, rh, rw, block, halo, stride, scale, c)))
            row[f"bwd q_chunk={c}"] = us(time_ms(
                lambda: _launch_bwd(g, q, k, v, rh, rw, out, lse, block, halo, stride, scale, c)))
        if chunks:
            sweep.append(row)
            print(row, flush=True)
        del inputs, g
        torch.cuda.empty_cache()
    print_table(rows, list(rows[0]), "halo attention, halo_h1 at 256, batch 64, bf16 (q, kv channels-last); GB/s: "
                                     "q, kv read once + output written once")
    if sweep:
        print_table(sweep, list(sweep[0]), "q_chunk sweep (kernels only, us)")


def model_throughput(name, impl, batch=64, size=256):
    """Images/s of one training step (bf16 autocast, channels-last, SGD)."""
    import timm

    import backbones  # noqa: F401
    os.environ["METAMIXER_OPS_IMPL"] = impl
    model = timm.create_model(name, num_classes=1000).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time_ms(step, warmup=5, rep=30)
    del model, opt
    torch.cuda.empty_cache()
    return batch / t * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--model", action="store_true", help="also time halo_h1 / timm halonet_h1 training steps")
    ap.add_argument("--no-sweep", action="store_true", help="skip the q_chunk sweep")
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    print(f"device: {device_name()}; copy bandwidth (read+write): {bw:.0f} GB/s", flush=True)
    if args.model:
        ref, tri = model_throughput("halo_h1", "reference"), model_throughput("halo_h1", "triton")
        timm_ref = model_throughput("halonet_h1", "reference")
        row = {"model": "halo_h1", "ref train img/s": ref, "triton train img/s": tri, "x ref": tri / ref,
               "timm halonet_h1 img/s": timm_ref, "x timm": tri / timm_ref}
        print_table([row], list(row), "training step, batch 64, 256, bf16 autocast, channels-last")
    bench_op(bw, not args.skip_compile, () if args.no_sweep else CHUNKS)


if __name__ == "__main__":
    main()
