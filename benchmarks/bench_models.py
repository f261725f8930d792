"""Model throughput: images/s for inference and for a training step, Triton ops vs the reference ops.

Run on a GPU:  PYTHONPATH=. python benchmarks/bench_models.py van_b0 ffnet_t [--batch 128]
bf16 autocast, channels-last. The ops path is switched with METAMIXER_OPS_IMPL (reference | auto); where timm
has the same architecture a `timm:<name>` entry times timm's model for comparison.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, time_ms  # noqa: E402

import timm  # noqa: E402

import backbones  # noqa: E402,F401


def throughput(name: str, batch: int, size: int, impl: str, profile: bool = False):
    os.environ["METAMIXER_OPS_IMPL"] = impl
    model = timm.create_model(name.removeprefix("timm:"), num_classes=1000).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def infer():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            model(x)

    def train():
        with torch.autocast("cuda", torch.bfloat16):
            out = model(x)
            out = out["main"] if isinstance(out, dict) else out[0] if isinstance(out, (tuple, list)) else out
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # seconds of repeats: a step takes 30-200 ms at batch 256, and a median of one or two samples once read an
    # inference 2.8x slower than the same model measured again (msmlp_t, 2026-11-24)
    model.eval()
    t_inf = time_ms(infer, warmup=200, rep=1500)
    model.train()
    t_train = time_ms(train, warmup=200, rep=1500)
    if profile:  # where a training step's GPU time goes, by kernel
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                train()
            torch.cuda.synchronize()
        print(f"\n{name} ({impl}), 3 training steps:")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    del model, opt
    torch.cuda.empty_cache()
    return batch / t_inf * 1e3, batch / t_train * 1e3


def _size(name: str, size: int) -> int:
    """``size``, or the model's own pretrained input size where its layout needs a multiple it is not."""
    own = timm.get_pretrained_cfg(name.removeprefix("timm:")).input_size[-1]
    mult = 256 if "halo" in name else 1  # HaloNet: every halo-attention map a multiple of its block size
    return size if size % mult == 0 else own


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224, help="input size; models that cannot take it use their "
                    "pretrained_cfg input size (e.g. HaloNet at 256)")
    ap.add_argument("--impl", choices=["auto", "triton"], default="auto",
                    help="the 'triton' columns: auto (the dispatchers' choice) or every op with a kernel forced")
    ap.add_argument("--profile", action="store_true", help="print the kernels of the Triton path's training step")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN time its algorithms (conf/trainer/gpu.yaml's benchmark: true), both paths")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    print(f"ops path '{args.impl}' vs 'reference'")
    print(f"device: {device_name()}; batch {args.batch}, {args.size}x{args.size}, bf16 autocast, channels-last, "
          f"cudnn.benchmark={args.cudnn_benchmark}")
    rows = []
    for name in args.models:
        size = _size(name, args.size)
        try:
            if name.startswith("timm:"):
                inf, tr = throughput(name, args.batch, size, "reference")
                row = {"model": name, "size": size, "infer img/s": inf, "train img/s": tr}
            else:
                ref_inf, ref_tr = throughput(name, args.batch, size, "reference")
                tri_inf, tri_tr = throughput(name, args.batch, size, args.impl, args.profile)
                row = {"model": name, "size": size, "ref infer img/s": ref_inf, "triton infer img/s": tri_inf,
                       "x infer": tri_inf / ref_inf, "ref train img/s": ref_tr, "triton train img/s": tri_tr,
                       "x train": tri_tr / ref_tr}
        except Exception as e:  # one model failing must not lose the others' rows
            row = {"model": f"{name} FAILED: {type(e).__name__}: {e}"[:120], "size": size}
        print(row, flush=True)
        rows.append(row)
    cols = ["model", "size", "ref infer img/s", "triton infer img/s", "x infer", "ref train img/s", "triton train img/s",
            "x train", "infer img/s", "train img/s"]
    print_table(rows, [c for c in cols if any(c in r for r in rows)], "model throughput")


if __name__ == "__main__":
    main()
