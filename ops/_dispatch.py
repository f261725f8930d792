"""Choosing between an op's plain-PyTorch reference and its Triton kernels.

Every op in ``ops/`` takes ``impl=None|'auto'|'reference'|'triton'``. ``None`` reads the environment variable
``METAMIXER_OPS_IMPL`` (default ``auto``; ``triton`` there takes the kernels wherever one exists for the
arguments, while an explicit ``impl='triton'`` for arguments without a kernel is an error). ``triton`` forces the
kernels (also on CPU tensors under ``TRITON_INTERPRET=1``, which is how the test-suite runs them without a GPU).

``auto`` takes the reference unless the inputs are CUDA tensors, Triton is importable and the op has a kernel for
the arguments. Then it follows the op's rule (``preferred``: where the op's benchmark measured the kernels faster),
the same choice, and so the same rounding, on every run.

``METAMIXER_OPS_AUTOTUNE=1`` makes ``auto`` decide by measurement on the running GPU instead, as ``cudnn.benchmark``
and Triton's autotuner do: at the first call with a new argument signature (shapes, strides, dtypes, which inputs
need gradients, grad mode, autocast) it times both paths back to back, forward and (where gradients are needed)
backward, on copies of the arguments, with ``cudnn.benchmark`` as the caller set it, and caches the faster one for
the rest of the process. Under ``torch.compile`` the same measurement runs once at trace time on random inputs of
the same signature, so the compiled graph holds the measured path. It is off by default: timed one op at a time it
does not yet pick as well as the rules for whole models (BENCHMARKS.md).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

ENV_VAR = "METAMIXER_OPS_IMPL"
AUTOTUNE_ENV_VAR = "METAMIXER_OPS_AUTOTUNE"
_CHOICES = ("auto", "reference", "triton")


_TRITON = importlib.util.find_spec("triton") is not None  # a plain constant: torch.compile traces it freely


def triton_available() -> bool:
    return _TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device type while autocast is on there, else None. Device types autocast does
    not know (``meta``, on which timm builds and traces models without memory) count as autocast off instead of
    raising inside ``torch.is_autocast_enabled``."""
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)



def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV_VAR, "0") == "1"


# (op name, signature) -> 'reference' | 'triton'; the measured choices of this process
_CHOSEN: Dict[Tuple[Any, ...], str] = {}
# op name -> the public dispatcher (it takes ``impl=``), for measurements that start from a signature alone
_OPS: Dict[str, Callable[..., Any]] = {}


def _arg_key(a: Any) -> Any:
    if torch.is_tensor(a):
        return ("T", tuple(a.shape), tuple(a.stride()), str(a.dtype).removeprefix("torch."), a.requires_grad)
    if isinstance(a, (list, tuple)):
        return tuple(_arg_key(v) for v in a)
    return a


def _all_float(k: Any) -> bool:
    """Whether every tensor a signature describes is floating point (random values can stand in for them)."""
    if isinstance(k, tuple) and len(k) == 5 and k[0] == "T":
        return k[3] in ("float32", "float16", "bfloat16", "float64")
    return all(_all_float(v) for v in k) if isinstance(k, tuple) else True


def _all_static(k: Any) -> bool:
    """Whether a signature holds no symbolic sizes (dynamic shapes under torch.compile): only then is it a constant
    the measurement can be keyed and run on."""
    if isinstance(k, tuple):
        return all(_all_static(v) for v in k)
    return not isinstance(k, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _from_key(k: Any, device: torch.device, like: Optional[Sequence[Any]] = None) -> Any:
    """The argument a signature entry describes: a copy of ``like`` (the real argument) where given, else random."""
    if isinstance(k, tuple) and len(k) == 5 and k[0] == "T":
        _, shape, stride, dtype, grad = k
        if like is not None:
            t = like.detach().clone(memory_format=torch.preserve_format)
        else:
            t = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=device).normal_()
        return t.requires_grad_(grad)
    if isinstance(k, tuple):
        return tuple(_from_key(v, device, None if like is None else like[i]) for i, v in enumerate(k))
    return k


def _median_ms(fn: Callable[[], Any], reps: int = 10, rounds: int = 3) -> float:
    """Milliseconds per call of ``fn`` run back to back, as a model runs its ops: the GPU time where the GPU is
    the bottleneck, the launch time where the host is (median of ``rounds``)."""
    for _ in range(2):  # Triton compiles, cuDNN (with benchmark on) picks its algorithm
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[rounds // 2]


def _measure(name: str, key: Tuple[Any, ...], device: str, args: Optional[Sequence[Any]] = None) -> str:
    """Time the op's two paths on the signature ``key`` and return the faster."""
    arg_keys, grad_mode, autocast_dtype = key
    dev = torch.device(device)

    def run(impl: str) -> Callable[[], None]:
        ins = _from_key(arg_keys, dev, args)
        leaves = [t for t in torch.utils._pytree.tree_leaves(ins) if torch.is_tensor(t) and t.requires_grad]

        def call():
            with torch.set_grad_enabled(grad_mode), torch.autocast(
                    dev.type, dtype=getattr(torch, autocast_dtype or "float32"), enabled=autocast_dtype is not None):
                out = _OPS[name](*ins, impl=impl)
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(o) and o.requires_grad]
            if grad_mode and leaves and outs:
                torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
        return call

    times = {impl: _median_ms(run(impl)) for impl in ("reference", "triton")}
    return min(times, key=times.get)


@torch._dynamo.assume_constant_result
def _measured_at_trace(name: str, key: Tuple[Any, ...], device: str) -> str:
    """``_measure`` on random inputs, called by dynamo at trace time with constant arguments: its result is a
    constant of the compiled graph."""
    full = (name, key)
    if full not in _CHOSEN:
        _CHOSEN[full] = _measure(name, key, device)
    return _CHOSEN[full]


def register_op(name: str, fn: Callable[..., Any]) -> None:
    """Let ``auto`` measure ``fn`` (an op's public dispatcher, which takes ``impl=``) by ``name``."""
    _OPS[name] = fn


def _measured_choice(op: str, args: Sequence[Any], x: torch.Tensor) -> Optional[str]:
    """The measured path for this call's signature, or None where no measurement can be made (stream capture, or a
    traced call with non-float tensor arguments whose values matter)."""
    ac = autocast_dtype(x)
    ac = None if ac is None else str(ac).removeprefix("torch.")
    key = (_arg_key(tuple(args)), torch.is_grad_enabled(), ac)
    if torch.compiler.is_compiling():
        if not (_all_float(key[0]) and _all_static(key[0])):
            return None
        return _measured_at_trace(op, key, str(x.device))
    full = (op, key)
    if full not in _CHOSEN:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        _CHOSEN[full] = _measure(op, key, str(x.device), args)
    return _CHOSEN[full]


def resolve_impl(impl: Optional[str], x: torch.Tensor, supported: bool = True, preferred: bool = True,
                 op: Optional[str] = None, args: Sequence[Any] = ()) -> str:
    """Return ``'reference'`` or ``'triton'`` for an op call on tensor ``x``.

    ``supported`` says whether the op has a Triton kernel for these particular arguments (e.g. stride 1 only).
    ``op`` (a name given to :func:`register_op`) and ``args`` (the call's positional arguments, without ``impl``)
    let ``auto`` measure both paths (see the module doc); ``preferred`` is ``auto``'s choice where it does not
    measure. Forcing ``'triton'`` for unsupported arguments is an error rather than a silent fallback.
    """
    choice = (impl or os.environ.get(ENV_VAR, "auto")).lower()
    if choice not in _CHOICES:
        raise ValueError(f"impl must be one of {_CHOICES} (or set {ENV_VAR}), got {choice!r}")
    if choice == "reference":
        return "reference"
    if impl is None and choice == "triton" and not supported:
        return "reference"  # the environment switches a whole model: ops without a kernel here keep theirs
    kernel_ok = supported and triton_available() and (x.is_cuda or interpreting())
    if choice == "triton":
        if not supported:
            raise ValueError("the Triton kernel does not support these arguments; use impl='reference'")
        if not kernel_ok:
            raise RuntimeError("impl='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
        return "triton"
    if not (kernel_ok and x.is_cuda):
        return "reference"
    if op is not None and autotune_enabled():
        chosen = _measured_choice(op, args, x)
        if chosen is not None:
            return chosen
    return "triton" if preferred else "reference"
