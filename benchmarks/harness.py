"""Benchmark harness shared by the ops benchmarks: CUDA-event medians, the copy-bandwidth ceiling, a table.

Times come from ``triton.testing.do_bench`` (CUDA events, median of repeated runs after warm-up, L2 flushed
between runs). Every table is measured in one process on one device; ratios are only meaningful inside it.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` (CUDA events)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_time_ms(fn: Callable[[], object]) -> Optional[float]:
    """Median milliseconds of ``fn()`` replayed from a CUDA graph: the GPU time without Python/launch overhead
    (what a CPU-bound ``time_ms`` hides). None when ``fn`` is None or cannot be captured."""
    from triton.testing import do_bench_cudagraph
    if fn is None:
        return None
    try:
        fn()  # allocate/compile outside the capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as e:
        print(f"  [no CUDA-graph time: {type(e).__name__}: {str(e)[:120]}]", file=sys.stderr)
        return None


def try_time_ms(fn: Callable[[], object], **kw) -> Optional[float]:
    try:
        return time_ms(fn, **kw)
    except Exception as e:  # a baseline that cannot run (e.g. compile failure) is reported, not fatal
        print(f"  [skipped a baseline: {type(e).__name__}: {str(e)[:120]}]", file=sys.stderr)
        return None


def us(ms: Optional[float]) -> Optional[float]:
    """Milliseconds (or None: a baseline that could not run) to microseconds."""
    return None if ms is None else ms * 1e3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> str:
    """Relative L2 error of ``a`` against ``b``, formatted for a table."""
    return f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}"


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad: torch.Tensor,
            allow_unused: bool = False) -> Callable[[], None]:
    """A callable running ``fn(*inputs)`` forward and backward (``grad`` as the output gradient) with respect to
    every input, for the timers above."""
    def run():
        torch.autograd.grad(fn(*inputs), inputs, grad, allow_unused=allow_unused)
    return run


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (the memory ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def device_name() -> str:
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}"


def fmt(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(rows: List[Dict[str, object]], columns: Sequence[str], title: str = "") -> None:
    """Print a Markdown table (so it can be pasted into the README as measured)."""
    if title:
        print(f"\n### {title}\n")
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in cells:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()
