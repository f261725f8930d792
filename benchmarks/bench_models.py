"""Model throughput against what a user would run instead: images/s for a training step and for inference, and the
training step's peak memory, for each of

  ref          the reference ops (plain PyTorch, cuDNN), eager
  ref+compile  the reference ops under ``torch.compile(model)``
  hub          the hub's ops (``METAMIXER_OPS_IMPL=auto``), eager
  hub+compile  the hub's ops under ``torch.compile(model)``
  timm         timm's own model of the same architecture, eager, where timm has it
  timm+compile timm's model under ``torch.compile``
  ...-cg       the same under ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs)

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_models.py ffnet_t van_b0 --batch 128 256
bf16 autocast, channels-last, ``torch.backends.cudnn.benchmark = True`` (as conf/trainer/gpu.yaml trains), a
plain SGD step. Compilation runs before timing and is reported in seconds, not timed. Times are medians of CUDA
events over about a second of repeats (``triton.testing.do_bench``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, time_ms  # noqa: E402

import timm  # noqa: E402

import backbones  # noqa: E402,F401

# hub name -> timm's model of the same architecture (timm registers DaViT and HaloNet itself)
TIMM_PEERS = {"davit_t": "davit_tiny", "halo_h1": "halonet_h1"}
MODES = ("ref", "ref+compile", "hub", "hub+compile", "timm", "timm+compile", "ref+compile-cg", "hub+compile-cg",
         "timm+compile-cg")


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def measure(name: str, mode: str, batch: int, size: int, rep_ms: int = 1500, profile: bool = False) -> dict:
    """Train and inference img/s, peak training memory and compile seconds of one model in one mode."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    os.environ["METAMIXER_OPS_IMPL"] = "reference" if mode.startswith("ref") else "auto"
    arch = TIMM_PEERS[name] if mode.startswith("timm") else name
    model = timm.create_model(arch, num_classes=1000).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    graphs = mode.endswith("-cg")
    fwd = torch.compile(model, mode="reduce-overhead" if graphs else None) if "+compile" in mode else model
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def train():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(_logits(fwd(x)).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            fwd(x)

    row = {}
    model.train()
    t0 = time.perf_counter()
    train()  # compiles (compiled modes) and lets cuDNN pick its algorithms
    torch.cuda.synchronize()
    row["compile s"] = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    row["train"] = batch / time_ms(train, warmup=200, rep=rep_ms) * 1e3
    row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    model.eval()
    infer()
    row["infer"] = batch / time_ms(infer, warmup=200, rep=rep_ms) * 1e3
    if profile:  # where a training step's time goes, by kernel
        model.train()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                train()
            torch.cuda.synchronize()
        print(f"\n{name} ({mode}), 3 training steps:")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=80))
    if mode.startswith("hub"):
        from ops._dispatch import _CHOSEN
        picks = {}
        for (op, _), impl in _CHOSEN.items():
            picks[f"{op}:{impl}"] = picks.get(f"{op}:{impl}", 0) + 1
        print(f"  {name} {mode}: auto's measured choices (op:path: signatures) {picks}", flush=True)
        _CHOSEN.clear()
    if "+compile" in mode:
        row["graph breaks"] = sum(counters["graph_break"].values())
    del model, opt, fwd
    torch.cuda.empty_cache()
    return row


def _size(name: str, size: int) -> int:
    """``size``, or the model's own pretrained input size where its layout needs a multiple it is not."""
    own = timm.get_pretrained_cfg(name).input_size[-1]
    mult = 256 if "halo" in name else 1  # HaloNet: every halo-attention map a multiple of its block size
    return size if size % mult == 0 else own


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, nargs="+", default=[128])
    ap.add_argument("--size", type=int, default=224, help="input size; models that cannot take it use their "
                    "pretrained_cfg input size (HaloNet at 256)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rep-ms", type=int, default=1500, help="milliseconds of timed repeats per cell")
    ap.add_argument("--profile", nargs="*", default=[], choices=MODES, help="print a by-kernel profile of these modes")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--stop-after-s", type=float, default=None,
                    help="start no further model after this many seconds (the rows so far are kept)")
    args = ap.parse_args()
    started = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    print(f"device: {device_name()}, Triton {getattr(sys.modules.get('triton'), '__version__', '-')}, "
          f"timm {timm.__version__}; bf16 autocast, channels-last, cudnn.benchmark=True, SGD step", flush=True)
    rows = []
    for batch in args.batch:
        for name in args.models:
            if args.stop_after_s is not None and time.perf_counter() - started > args.stop_after_s:
                print(f"stopped after {args.stop_after_s:.0f} s: batch {batch} {name} not run", flush=True)
                continue
            size = _size(name, args.size)
            row = {"model": name, "batch": batch, "size": size}
            for mode in args.modes:
                if mode.startswith("timm") and name not in TIMM_PEERS:
                    continue
                try:
                    r = measure(name, mode, batch, size, args.rep_ms, mode in args.profile)
                except Exception as e:  # one cell failing must not lose the others
                    print(f"{name} {mode} batch {batch} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                print(name, mode, batch, {k: round(v, 2) for k, v in r.items()}, flush=True)
                for k, v in r.items():
                    row[f"{mode} {k}"] = v
            rows.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    for kind in ("train", "infer"):
        table = []
        for r in rows:
            t = {"model": r["model"], "batch": r["batch"]}
            best_peer = max((r.get(f"{m} {kind}") or 0) for m in MODES if not m.startswith("hub"))
            best_hub = max((r.get(f"{m} {kind}") or 0) for m in MODES if m.startswith("hub"))
            for m in args.modes:
                t[m] = r.get(f"{m} {kind}")
            t["hub best / ref+compile"] = best_hub / r["ref+compile " + kind] if r.get("ref+compile " + kind) else None
            t["hub best / best peer"] = best_hub / best_peer if best_peer else None
            if kind == "train":
                t["peak GiB ref / hub"] = (f"{r.get('ref peak GiB', 0):.2f} / {r.get('hub peak GiB', 0):.2f}")
            table.append(t)
        cols = ["model", "batch", *args.modes, "hub best / ref+compile", "hub best / best peer"]
        if kind == "train":
            cols.append("peak GiB ref / hub")
        print_table(table, cols, f"{kind} img/s")


if __name__ == "__main__":
    main()
