"""lif_multistep and spiking_attention benchmark: Triton vs the eager reference vs torch.compile of the reference
vs spikingjelly's CuPy LIF (where it can run) vs a plain copy of the same tensor (the memory floor).

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_lif.py [--no-compile]
LIF table: per shape and dtype, forward times without autograd (ours then writes the spikes only: the copy's
bytes) and with it ("fwd+z": ours also writes z for the backward), backward times (us; ``autograd.grad`` on a
retained graph),
our time over the copy time (target <= 2), speed-up over torch.compile (target >= 2) and over spikingjelly's CuPy
kernels (target >= 1.5; fp32 only, CuPy's kernels take fp32/fp16), achieved GB/s (forward: x read + spikes and z
written; backward: grad and z read + grad written) as % of the copy bandwidth measured in the same run, and the
number of spikes that differ from the reference (fp32: the reference itself; bf16: the reference on the fp32-upcast
input, which is what the kernel computes). torch.compile is timed on the issue's shape only (each shape recompiles).
"graph" columns are GPU time from CUDA-graph replays (no host overhead): forward+backward captured together, and the
backward as that minus the captured autograd forward (a backward captured alone would run on its forward's stream,
outside the capture).
Attention table: Spikformer's SSA core ``LIF((q @ (k^T @ v)) * scale)`` plus folding heads back into channels, as the
model runs it: the fused Triton kernel vs matmuls + the Triton LIF vs the eager reference.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import copy_bandwidth_gbs, device_name, graph_time_ms, print_table, time_ms, try_time_ms, us  # noqa: E402

from ops.lif import lif_multistep, lif_multistep_reference  # noqa: E402
from ops.spiking_attention import spiking_attention, spiking_attention_reference  # noqa: E402

T = 4
# (label, per-step shape): the shape, then the LIFs of spikformer_8_384 at batch 32, 224x224 (count per model)
SHAPES = [
    ("issue 64x384x14x14", (64, 384, 14, 14)),
    ("s8_384 stem0 32x48x224x224 (x1)", (32, 48, 224, 224)),
    ("s8_384 stem1 32x96x112x112 (x1)", (32, 96, 112, 112)),
    ("s8_384 stem2 32x192x56x56 (x1)", (32, 192, 56, 56)),
    ("s8_384 stem3 32x384x28x28 (x1)", (32, 384, 28, 28)),
    ("s8_384 block 32x384x14x14 (x49)", (32, 384, 14, 14)),
    ("s8_384 fc1 32x1536x14x14 (x8)", (32, 1536, 14, 14)),
]


def _spikingjelly_node():
    try:
        import numpy as np
        if not hasattr(np, "int"):  # spikingjelly 0.0.0.0.14 still uses the alias NumPy 1.24 removed
            np.int = int
        from spikingjelly.activation_based import neuron
        node = neuron.LIFNode(tau=2.0, detach_reset=True, step_mode="m", backend="cupy").cuda().train()
        x = torch.randn(4, 1000, device="cuda", requires_grad=True)
        node(x).sum().backward()  # compiles its CuPy kernels (forward and backward) once
        node.reset()
        return node
    except Exception as e:
        print(f"  [spikingjelly CuPy LIF unavailable: {type(e).__name__}: {str(e)[:160]}]", file=sys.stderr)
        return None


def _bwd_timer(fn, x):
    xs = x.detach().clone().requires_grad_()
    out = fn(xs)
    g = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, xs, g, retain_graph=True)


def _fb(fn, x):
    """forward with autograd + backward, the way a training step runs it (capturable: the forward runs on the
    capturing stream, so the backward follows it there)."""
    xs = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    return lambda: torch.autograd.grad(fn(xs), xs, g)


def _fz(fn, x):
    xs = x.detach().clone().requires_grad_()
    return lambda: fn(xs)


def _gpu_bwd(fn, x):
    """GPU-only backward time (ms): CUDA-graph time of forward+backward minus that of the autograd forward."""
    fb, fz = graph_time_ms(_fb(fn, x)), graph_time_ms(_fz(fn, x))
    return (None, None) if fb is None or fz is None else (fb, fb - fz)


def bench_lif(label, shape, dtype, bw, compiled, sj_node):
    torch.manual_seed(0)
    x = torch.randn(T, *shape, device="cuda", dtype=dtype)
    y = torch.empty_like(x)
    n_el = x.numel()
    ours = lambda a: lif_multistep(a, impl="triton")  # noqa: E731
    ref = lif_multistep_reference
    rep = dict(warmup=10, rep=50) if n_el > 1e8 else {}

    def sj(a):
        sj_node.reset()
        return sj_node(a)

    use_sj = sj_node is not None and dtype == torch.float32
    s = ours(x)
    mismatch = int((s.float() != ref(x.float())).sum())
    if use_sj:
        mismatch_sj = int((sj(x) != s).sum())
        if mismatch_sj:
            print(f"  [{label}: spikingjelly CuPy spikes differ from ours at {mismatch_sj} places]", file=sys.stderr)
    t_copy = time_ms(lambda: y.copy_(x), **rep)
    t_f = time_ms(lambda: ours(x), **rep)
    xg = x.detach().clone().requires_grad_()
    t_fz = time_ms(lambda: ours(xg), **rep)
    t_f_ref = time_ms(lambda: ref(x), **rep)
    t_f_comp = try_time_ms(lambda: compiled(x), **rep) if compiled else None
    t_f_sj = try_time_ms(lambda: sj(x), **rep) if use_sj else None
    del s
    t_b = time_ms(_bwd_timer(ours, x), **rep)
    t_b_ref = time_ms(_bwd_timer(ref, x), **rep)
    t_b_comp = try_time_ms(_bwd_timer(compiled, x), **rep) if compiled else None
    t_b_sj = try_time_ms(_bwd_timer(sj, x), **rep) if use_sj else None
    # the same without host overhead: CUDA-graph replays (the autograd calls above are host-bound at small sizes)
    g_fb, g_b = _gpu_bwd(ours, x)
    g_fb_comp, g_b_comp = _gpu_bwd(compiled, x) if compiled else (None, None)
    es = x.element_size()
    zs = 2 if dtype == torch.bfloat16 else 4
    fwd_gbs = n_el * 2 * es / (t_f * 1e-3) / 1e9
    bwd_gbs = n_el * (2 * es + zs) / (t_b * 1e-3) / 1e9
    torch.cuda.empty_cache()
    return {
        "shape (T=4)": label, "dtype": str(dtype).split(".")[-1], "copy us": us(t_copy),
        "fwd us": us(t_f), "eager fwd": us(t_f_ref), "compile fwd": us(t_f_comp), "cupy fwd": us(t_f_sj),
        "fwd+z us": us(t_fz), "fwd/copy": t_f / t_copy, "fwd+z/copy": t_fz / t_copy,
        "x compile fwd": (t_f_comp / t_f) if t_f_comp else None,
        "x cupy fwd": (t_f_sj / t_f) if t_f_sj else None,
        "bwd us": us(t_b), "eager bwd": us(t_b_ref), "compile bwd": us(t_b_comp), "cupy bwd": us(t_b_sj),
        "bwd/copy": t_b / t_copy, "x compile bwd": (t_b_comp / t_b) if t_b_comp else None,
        "x cupy bwd": (t_b_sj / t_b) if t_b_sj else None,
        "graph f+b us": us(g_fb), "graph compile f+b": us(g_fb_comp),
        "x compile f+b (graph)": (g_fb_comp / g_fb) if g_fb and g_fb_comp else None,
        "graph bwd us": us(g_b), "graph compile bwd": us(g_b_comp),
        "graph bwd/copy": g_b / t_copy if g_b else None,
        "x compile bwd (graph)": (g_b_comp / g_b) if g_b and g_b_comp else None,
        "fwd % bw": 100 * fwd_gbs / bw, "bwd % bw": 100 * bwd_gbs / bw, "spike mismatches": mismatch,
    }


def bench_attention(B, heads, N, d, dtype, scale=0.125):
    torch.manual_seed(0)
    C = heads * d

    def spikes():  # (T, B, heads, N, d) head views of a (T, B, C, N) spike map, as the model makes them
        m = (torch.rand(T, B, C, N, device="cuda") < 0.2).to(dtype)
        return m.reshape(T, B, heads, d, N).transpose(-1, -2)

    q, k, v = spikes(), spikes(), spikes()

    def run(fn):
        def f(q, k, v):
            return fn(q, k, v).transpose(-1, -2).reshape(T, B, C, N)  # fold heads into channels, as the model does
        return f

    fused = run(lambda q, k, v: spiking_attention(q, k, v, scale, impl="triton"))
    unfused = run(lambda q, k, v: lif_multistep((q @ (k.transpose(-2, -1) @ v)) * scale, 2.0, 0.5, impl="triton"))
    eager = run(lambda q, k, v: spiking_attention_reference(q, k, v, scale))
    want = eager(q.float(), k.float(), v.float())
    mismatch = int((fused(q, k, v).float() != want).sum())
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(T, B, C, N, device="cuda", dtype=dtype)

    def fb(f):
        return lambda: torch.autograd.grad(f(qs, ks, vs), (qs, ks, vs), g)

    t = {name: (time_ms(lambda: f(q, k, v)) * 1e3, time_ms(fb(f)) * 1e3)
         for name, f in (("fused", fused), ("unfused", unfused), ("eager", eager))}
    return {
        "shape (T, B, heads, N, d)": f"({T}, {B}, {heads}, {N}, {d})", "dtype": str(dtype).split(".")[-1],
        "fused fwd us": t["fused"][0], "matmul+LIF fwd": t["unfused"][0], "eager fwd": t["eager"][0],
        "x matmul+LIF fwd": t["unfused"][0] / t["fused"][0], "fused f+b us": t["fused"][1],
        "matmul+LIF f+b": t["unfused"][1], "eager f+b": t["eager"][1],
        "x matmul+LIF f+b": t["unfused"][1] / t["fused"][1], "spike mismatches": mismatch,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--quick", action="store_true", help="the issue's shape only")
    ap.add_argument("--profile", action="store_true", help="also print a profile of the backward passes")
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    print(f"device: {device_name()}; copy bandwidth (read+write): {bw:.0f} GB/s")
    sj_node = _spikingjelly_node()
    compiled = None if args.no_compile else torch.compile(lif_multistep_reference, dynamic=False)
    cols = ["shape (T=4)", "dtype", "copy us", "fwd us", "eager fwd", "compile fwd", "cupy fwd", "fwd/copy",
            "fwd+z us", "fwd+z/copy",
            "x compile fwd", "x cupy fwd", "bwd us", "eager bwd", "compile bwd", "cupy bwd", "bwd/copy",
            "x compile bwd", "x cupy bwd", "graph f+b us", "graph compile f+b", "x compile f+b (graph)",
            "graph bwd us", "graph compile bwd", "graph bwd/copy", "x compile bwd (graph)", "fwd % bw", "bwd % bw", "spike mismatches"]
    shapes = SHAPES[:1] if args.quick else SHAPES
    for dtype in (torch.float32, torch.bfloat16):
        rows = [bench_lif(label, shape, dtype, bw, compiled if i == 0 else None, sj_node)
                for i, (label, shape) in enumerate(shapes)]
        print_table(rows, cols, f"lif_multistep, {str(dtype).split('.')[-1]}, T={T} (times in us)")
    rows = [bench_attention(32, 8, 196, 48, dt) for dt in (torch.float32, torch.bfloat16)]
    rows += [bench_attention(64, 8, 196, 64, torch.bfloat16)]
    print_table(rows, list(rows[0]), "spiking attention + attn LIF + head fold (times in us; fp32: the dispatcher's "
                                     "matmul + Triton LIF path)")
    if args.profile:
        profile()


def profile():
    """Where the time of one LIF backward and one fused-attention forward+backward goes (bf16, model shapes)."""
    from torch.profiler import ProfilerActivity, profile as prof
    x = torch.randn(T, 32, 384, 14, 14, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = lif_multistep(x, impl="triton")
    g = torch.randn_like(out)
    q, k, v = ((torch.rand(T, 32, 8, 196, 48, device="cuda") < 0.2).bfloat16().requires_grad_() for _ in range(3))
    ga = torch.randn(T, 32, 8, 196, 48, device="cuda", dtype=torch.bfloat16)

    def step():
        torch.autograd.grad(out, x, g, retain_graph=True)
        torch.autograd.grad(spiking_attention(q, k, v, 0.125, impl="triton"), (q, k, v), ga)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
