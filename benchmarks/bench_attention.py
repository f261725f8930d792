"""Attention-style mixers (issue 12): na2d_qk / na2d_av (OverLoCK ContMix) and DaViT channel attention.

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_attention.py [--skip-compile] [--only na2d] [--model overlock_xt]
Shapes: what overlock_xt and davit_t produce at 224 input, batch 64, bf16. Tables: times in us (forward, and
forward+backward), ours vs the eager reference (and, forward+backward, torch.compile of the reference), achieved
GB/s of the forward (each input read once + output written once) as % of the copy bandwidth measured in the same run.
The na2d chain table times logits (q.k + rpb) -> softmax -> aggregation, ours vs the same chain on the reference ops,
compiled, and FlexAttention (compiled) with a neighbourhood mask_mod and the RPB as score_mod.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    copy_bandwidth_gbs, device_name, fwd_bwd, graph_time_ms, print_table, rel_err, time_ms, try_time_ms, us)

from ops.channel_attention import channel_attention, channel_attention_reference  # noqa: E402
from ops.na2d import na2d_av, na2d_av_reference, na2d_qk, na2d_qk_reference, window_start  # noqa: E402
from ops.na2d_attention import na2d_attention  # noqa: E402

DT = torch.bfloat16
# (label, B, heads, H, W, head_dim, kernel_size): overlock_xt ContMix at 224 (stage 3: 14x14, 8 heads of 16
# channels per kernel; stage 4: 7x7, 12 heads of 14 channels), the small 5x5 and the large k x k kernel
NA2D_SHAPES = [
    ("xt s3 5x5", 64, 8, 14, 14, 16, 5),
    ("xt s3 13x13", 64, 8, 14, 14, 16, 13),
    ("xt s4 5x5", 64, 12, 7, 7, 14, 5),
    ("xt s4 7x7", 64, 12, 7, 7, 14, 7),
]
# (label, B, N tokens, C, heads): davit_t channel attention at 224
CA_SHAPES = [("davit_t s1", 64, 3136, 96, 3), ("davit_t s2", 64, 784, 192, 6), ("davit_t s3", 64, 196, 384, 12),
             ("davit_t s4", 64, 49, 768, 24)]


def _row(label, ours, ref, comp, inputs, out_bytes, bw, fb_inputs):
    """Forward and forward+backward rows for one op: callables take the inputs positionally."""
    t = us(time_ms(lambda: ours(*inputs)))
    tr = us(time_ms(lambda: ref(*inputs)))
    g = torch.randn_like(ref(*inputs))
    tb = us(time_ms(fwd_bwd(ours, fb_inputs, g)))
    tbr = us(time_ms(fwd_bwd(ref, fb_inputs, g)))
    tbc = us(try_time_ms(fwd_bwd(comp, fb_inputs, g))) if comp else None
    # GPU time without host overhead (CUDA-graph replays; the wall f+b is host-bound at small shapes)
    tg, tgr = (us(graph_time_ms(fwd_bwd(f, fb_inputs, g))) for f in (ours, ref))
    tgc = us(graph_time_ms(fwd_bwd(comp, fb_inputs, g))) if comp else None
    gbs = (sum(x.numel() * x.element_size() for x in inputs if torch.is_tensor(x)) + out_bytes) / (t * 1e-6) / 1e9
    return {"shape": label, "fwd us": t, "ref fwd": tr, "x ref": tr / t, "GB/s": gbs, "% copy bw": 100 * gbs / bw,
            "f+b us": tb, "ref f+b": tbr, "compile f+b": tbc, "x ref f+b": tbr / tb,
            "x compile f+b": tbc / tb if tbc else None, "graph f+b us": tg, "ref graph f+b": tgr,
            "x ref graph f+b": tgr / tg if tg and tgr else None, "compile graph f+b": tgc,
            "x compile graph f+b": tgc / tg if tg and tgc else None, "rel err": rel_err(ours(*inputs), ref(*inputs))}


COLS = ["shape", "fwd us", "ref fwd", "x ref", "GB/s", "% copy bw", "f+b us", "ref f+b", "compile f+b", "x ref f+b",
        "x compile f+b", "graph f+b us", "ref graph f+b", "x ref graph f+b", "compile graph f+b", "x compile graph f+b",
        "rel err"]


def bench_na2d(bw, compile_ok):
    av_rows, qk_rows, chain_rows = [], [], []
    comp_av = torch.compile(na2d_av_reference, dynamic=False) if compile_ok else None
    comp_qk = torch.compile(na2d_qk_reference, dynamic=False) if compile_ok else None
    for label, B, G, H, W, D, k in NA2D_SHAPES:
        attn = torch.randn(B, G, H, W, k * k, device="cuda").softmax(-1).to(DT)
        q, key, v = torch.randn(3, B, G, H, W, D, device="cuda", dtype=DT).unbind(0)
        rpb = torch.randn(G, 2 * k - 1, 2 * k - 1, device="cuda", dtype=DT)
        fb = [t.detach().clone().requires_grad_() for t in (attn, v)]
        av_rows.append(_row(label, lambda a, x: na2d_av(a, x, k, impl="triton"),
                            lambda a, x: na2d_av_reference(a, x, k),
                            (lambda a, x: comp_av(a, x, k)) if comp_av else None, (attn, v), v.numel() * 2, bw, fb))
        print(av_rows[-1], flush=True)
        fb = [t.detach().clone().requires_grad_() for t in (q, key, rpb)]
        qk_rows.append(_row(label, lambda a, b, r: na2d_qk(a, b, k, 1, r, impl="triton"),
                            lambda a, b, r: na2d_qk_reference(a, b, k, 1, r),
                            (lambda a, b, r: comp_qk(a, b, k, 1, r)) if comp_qk else None,
                            (q, key, rpb), attn.numel() * 2, bw, fb))
        print(qk_rows[-1], flush=True)
        chain_rows.append(bench_chain(label, B, G, H, W, D, k, compile_ok))
        print(chain_rows[-1], flush=True)
    print_table(av_rows, COLS, "na2d_av (attn [B,G,H,W,k*k], value [B,G,H,W,D]), bf16")
    print_table(qk_rows, COLS, "na2d_qk with rpb (query/key [B,G,H,W,D]), bf16")
    print_table(chain_rows, ["shape", "ours f+b us", "ref f+b", "compile f+b", "flex f+b", "x ref", "x compile",
                             "x flex", "flex rel err", "fused f+b us", "fused x flex", "fused x ref", "fused x compile",
                             "fused rel err"],
                "na2d chain: softmax(q.k + rpb) -> aggregation, forward+backward, bf16 (ours: the unfused ops; "
                "fused: ops.na2d_attention)")


def bench_chain(label, B, G, H, W, D, k, compile_ok):
    def chain(q, key, v, rpb, impl):
        attn = na2d_qk(q, key, k, 1, rpb, impl=impl).softmax(-1)
        return na2d_av(attn, v, k, impl=impl)

    q, key, v = torch.randn(3, B, G, H, W, D, device="cuda", dtype=DT).unbind(0)
    rpb = torch.randn(G, 2 * k - 1, 2 * k - 1, device="cuda", dtype=DT)
    inputs = [t.detach().clone().requires_grad_() for t in (q, key, v, rpb)]
    g = torch.randn_like(v)
    t = us(time_ms(fwd_bwd(lambda *a: chain(*a, "triton"), inputs, g)))
    tr = us(time_ms(fwd_bwd(lambda *a: chain(*a, "reference"), inputs, g)))
    tc = None
    if compile_ok:
        comp = torch.compile(lambda *a: chain(*a, "reference"), dynamic=False)
        tc = us(try_time_ms(fwd_bwd(comp, inputs, g)))
    tf, err = None, None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        si, sj = window_start(H, k, 1, "cuda"), window_start(W, k, 1, "cuda")

        def mask_mod(b, h, qi, ki):
            r0, c0 = si[qi // W], sj[qi % W]
            kr, kc = ki // W, ki % W
            return (kr >= r0) & (kr < r0 + k) & (kc >= c0) & (kc < c0 + k)

        rpb_leaf = inputs[3]

        def score_mod(score, b, h, qi, ki):  # d = 1: the bias index is k-1 + (neighbour - pixel) on each axis
            r = (ki // W - qi // W + k - 1).clamp(0, 2 * k - 2)  # clamped: masked pairs are evaluated too
            c = (ki % W - qi % W + k - 1).clamp(0, 2 * k - 2)
            return score + rpb_leaf[h, r, c]

        block_mask = create_block_mask(mask_mod, None, None, H * W, H * W, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)

        def run_flex(q, key, v, rpb):  # rpb enters through score_mod (rpb_leaf is inputs[3])
            out = flex(q.flatten(2, 3), key.flatten(2, 3), v.flatten(2, 3), score_mod=score_mod,
                       block_mask=block_mask, scale=1.0)
            return out.unflatten(2, (H, W))

        err = rel_err(run_flex(*inputs), chain(*inputs, "reference"))
        tf = us(try_time_ms(fwd_bwd(run_flex, inputs, g, allow_unused=True)))
    except Exception as e:  # FlexAttention may refuse a head width (e.g. 14)
        print(f"  [flex skipped: {type(e).__name__}: {str(e)[:160]}]", file=sys.stderr)
    fused = lambda q_, k_, v_, r_: na2d_attention(q_, k_, v_, k, r_, impl="triton")  # noqa: E731
    tfu = us(time_ms(fwd_bwd(fused, inputs, g)))
    return {"shape": label, "ours f+b us": t, "ref f+b": tr, "compile f+b": tc, "flex f+b": tf, "x ref": tr / t,
            "x compile": tc / t if tc else None, "x flex": tf / t if tf else None, "flex rel err": err,
            "fused f+b us": tfu, "fused x flex": tf / tfu if tf else None,
            "fused x ref": tr / tfu, "fused x compile": tc / tfu if tc else None,
            "fused rel err": rel_err(fused(*inputs), chain(*inputs, "reference"))}


def bench_channel_attention(bw, compile_ok):
    rows = []
    comp = torch.compile(channel_attention_reference, dynamic=False) if compile_ok else None
    for label, B, N, C, heads in CA_SHAPES:
        qkv = torch.randn(B, N, 3 * C, device="cuda", dtype=DT)
        fb = [qkv.detach().clone().requires_grad_()]
        rows.append(_row(label, lambda x: channel_attention(x, heads, impl="triton"),
                         lambda x: channel_attention_reference(x, heads), (lambda x: comp(x, heads)) if comp else None,
                         (qkv,), B * N * C * 2, bw, fb))
        print(rows[-1], flush=True)
    print_table(rows, COLS, "DaViT channel attention (qkv [B,N,3C] -> [B,N,C]), bf16; GB/s: qkv read once + out "
                            "written once")


def model_throughput(name, batch, impl):
    """Images/s of one training step (bf16 autocast, channels-last, SGD); OverLoCK's train-mode output is a dict
    (main + auxiliary logits): both losses are summed."""
    import timm

    import backbones  # noqa: F401
    os.environ["METAMIXER_OPS_IMPL"] = impl
    model = timm.create_model(name, num_classes=1000).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            out = model(x)
            outs = out.values() if isinstance(out, dict) else [out]
            loss = sum(torch.nn.functional.cross_entropy(o.float(), y) for o in outs)
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
    ap.add_argument("--only", choices=["na2d", "channel"], default=None)
    ap.add_argument("--model", nargs="*", default=[], help="also time training steps of these models at batch 64")
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    print(f"device: {device_name()}; copy bandwidth (read+write): {bw:.0f} GB/s", flush=True)
    if args.model:
        rows = []
        for name in args.model:
            ref, tri = model_throughput(name, 64, "reference"), model_throughput(name, 64, "auto")
            rows.append({"model": name, "ref train img/s": ref, "triton train img/s": tri, "x train": tri / ref})
            print(rows[-1], flush=True)
        print_table(rows, list(rows[0]), "training step, batch 64, 224, bf16 autocast, channels-last (all ops)")
    if args.only in (None, "na2d"):
        bench_na2d(bw, not args.skip_compile)
    if args.only in (None, "channel"):
        bench_channel_attention(bw, not args.skip_compile)


if __name__ == "__main__":
    main()
