"""timm's own model test-suite (``tests/test_models.py`` of the installed timm's sdist), run over the hub's models.

The test code is not part of this repository: at collection time it is downloaded with pip (the sdist of exactly the
installed timm version) into ``~/.cache/metamixer-hub/timm-tests/<version>/`` and imported with its model lists
restricted to the hub's models and the hub's family modules added to ``FEAT_INTER_FILTERS`` (the families whose
``forward_intermediates`` it checks). Tests that take no hub model (timm's fixed model-name regressions) are not
collected. Which hub models take part:

* default (``METAMIXER_TIMM_SUITE`` unset or ``ci``): ``CI_MODELS``, the smallest variant of each family;
* ``METAMIXER_TIMM_SUITE=all``: every hub model, e.g.
  ``METAMIXER_TIMM_SUITE=all python -m pytest tests/test_timm_suite.py -n 2``.

``EXCLUDE`` is the one list of (test, model) pairs that do not run, each with its reason. Without network (and no
cached copy) ``test_timm_suite_source`` fails and says why; nothing is skipped.
"""
from __future__ import annotations

import fnmatch
import importlib
import inspect
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import timm
import timm.models._registry as registry

import backbones

# The smallest variant of each family (by parameter count; Spikformer's smallest with the standard 3+ feature levels).
CI_MODELS = [
    "davit_t", "ffnet_t", "halo_h0", "msmlp_t", "overlock_xt", "spikformer_cifar_4_256", "transnext_micro", "van_b0",
]

# (timm test name, hub model name pattern, reason): fnmatch patterns, as timm's own *_FILTERS lists are.
EXCLUDE = [
    ("test_model_forward_torchscript", "*",
     "TorchScript: the installed torch deprecates torch.jit.script (its warning points to torch.compile/torch.export)"),
    ("test_model_forward_fx_torchscript", "*",
     "TorchScript after FX: the installed torch deprecates torch.jit.script (see test_model_forward_torchscript)"),
    ("test_model_load_pretrained", "*",
     "downloads every published checkpoint (GBs); tests/test_pretrained_download.py covers the loading path offline"),
    ("test_model_features_pretrained", "*",
     "downloads every published checkpoint (GBs); tests/test_pretrained_download.py covers the loading path offline"),
    ("test_model_forward_features", "spikformer_cifar_2_*",
     "a 2-stage CIFAR Spikformer has 2 feature levels; the test requires at least 3"),
    ("test_model_forward_features", "spikformer_dvs_2_*",
     "a 2-stage DVS Spikformer has 2 feature levels; the test requires at least 3"),
    ("test_model_forward_intermediates", "spikformer_cifar_2_*",
     "a 2-stage CIFAR Spikformer has 2 feature levels; the test requires at least 3"),
    ("test_model_forward_intermediates", "spikformer_dvs_2_*",
     "a 2-stage DVS Spikformer has 2 feature levels; the test requires at least 3"),
    ("test_model_backward*", "overlock_*",
     "the official auxiliary head gets gradients only with set_aux_training(True) (use_ds=False builds without it)"),
]

ENV_VAR = "METAMIXER_TIMM_SUITE"


def hub_models() -> dict:
    """``{model name: family module}`` for every model registered by a ``backbones.*`` module."""
    return {n: fn.__module__.rsplit(".", 1)[-1] for n, fn in registry._model_entrypoints.items()
            if fn.__module__.startswith(backbones.__name__ + ".")}


def selected_models() -> list:
    mode = os.environ.get(ENV_VAR, "ci").lower()
    if mode == "ci":
        return list(CI_MODELS)
    if mode == "all":
        return sorted(hub_models())
    raise ValueError(f"{ENV_VAR} must be 'ci' (default: the smallest variant of each family) or 'all', got {mode!r}")


def timm_tests_dir(version: str = timm.__version__) -> Path:
    """``tests/`` of timm's sdist for ``version``, downloaded with pip on first use and cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metamixer-hub" / "timm-tests" / version
    tests = cache / "tests"
    if (tests / "test_models.py").is_file():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "1",
               "--timeout", "30", "--disable-pip-version-check", f"timm=={version}", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        sdists = sorted(Path(tmp).glob("timm-*.tar.gz"))
        if res.returncode or not sdists:
            raise RuntimeError(f"could not download the sdist of timm=={version} (needed for timm's own test-suite; "
                               f"network access to the package index is required once, then it is cached in "
                               f"{cache}). `{' '.join(cmd)}` said:\n{res.stderr[-3000:]}")
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[1:2] == ["tests"]]
            tar.extractall(tmp, members=members, filter="data")
        top = members[0].name.split("/")[0]
        try:
            os.replace(Path(tmp) / top / "tests", tests)  # atomic: pytest-xdist workers may race here
        except OSError:
            if not (tests / "test_models.py").is_file():
                raise
    return tests


def _import_timm_tests(tests: Path, models: list):
    """Import timm's test_models.py with its model lists restricted to ``models`` (tags like '.in1k' kept)."""
    families = sorted(set(hub_models().values()))
    source = (tests / "test_models.py").read_text()
    anchor = "FEAT_INTER_FILTERS = ["
    if source.count(anchor) != 1:
        raise RuntimeError(f"timm's test_models.py no longer defines FEAT_INTER_FILTERS as expected ({anchor!r})")
    source = source.replace(anchor, f"FEAT_INTER_FILTERS = {families!r} + [")
    gen_dir = tests.parent / "hub"
    gen_dir.mkdir(exist_ok=True)
    name = "timm_test_models_for_hub"
    fd, tmp = tempfile.mkstemp(dir=gen_dir, suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, gen_dir / f"{name}.py")

    keep = set(models)
    list_models, list_pretrained = timm.list_models, timm.list_pretrained

    def restrict(fn):
        def wrapper(*args, **kwargs):
            return [n for n in fn(*args, **kwargs) if n.split(".")[0] in keep]
        return wrapper

    pytest.register_assert_rewrite(name)
    sys.path.insert(0, str(gen_dir))
    try:
        with mock.patch.object(timm, "list_models", restrict(list_models)), \
                mock.patch.object(timm, "list_pretrained", restrict(list_pretrained)):
            sys.modules.pop(name, None)
            return importlib.import_module(name)
    finally:
        sys.path.remove(str(gen_dir))


def _excluded(test_name: str, model_name: str) -> bool:
    return any(fnmatch.fnmatch(test_name, t) and fnmatch.fnmatch(model_name.split(".")[0], m) for t, m, _ in EXCLUDE)


def _hub_tests(module, models: list) -> dict:
    """timm's tests parametrized by hub models, their model lists filtered by ``EXCLUDE``; the fixtures they use."""
    keep, out = set(models), {}
    for name, fn in vars(module).items():
        if not (name.startswith("test_") and inspect.isfunction(fn)):
            continue
        marks, takes_hub_models = [], False
        for mark in getattr(fn, "pytestmark", []):
            argnames = mark.args[0] if mark.name == "parametrize" and mark.args else None
            argnames = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else argnames
            if argnames and "model_name" in argnames:
                i = argnames.index("model_name")
                values = list(mark.args[1])
                model_of = (lambda v: v) if len(argnames) == 1 else (lambda v, i=i: v[i])
                if not values or any(model_of(v).split(".")[0] not in keep for v in values):
                    break  # timm's fixed model names: not a test of the hub's models
                values = [v for v in values if not _excluded(name, model_of(v))]
                if not values:
                    break
                takes_hub_models = True
                mark = pytest.mark.parametrize(mark.args[0], values, **mark.kwargs).mark
            marks.append(mark)
        else:
            if takes_hub_models:
                fn.pytestmark = marks
                out[name] = fn
                for arg in inspect.signature(fn).parameters:  # fixtures the test requests (e.g. cfg_device)
                    if arg in vars(module) and not arg.startswith("test_"):
                        out.setdefault(arg, getattr(module, arg))
    return out


_SELECTED = selected_models()
try:
    _TIMM_TESTS = _import_timm_tests(timm_tests_dir(), _SELECTED)
    _SOURCE_ERROR = None
except Exception as e:  # reported by test_timm_suite_source, so the rest of our suite still runs
    _TIMM_TESTS, _SOURCE_ERROR = None, e
else:
    globals().update(_hub_tests(_TIMM_TESTS, _SELECTED))


def test_timm_suite_source():
    """timm's test-suite was fetched and imported, every selected hub model is in its model lists."""
    if _SOURCE_ERROR is not None:
        pytest.fail(f"timm's test-suite is unavailable: {type(_SOURCE_ERROR).__name__}: {_SOURCE_ERROR}", pytrace=False)
    families = set(hub_models().values())
    assert families <= set(_TIMM_TESTS.FEAT_INTER_FILTERS)
    forward = [v for m in test_model_forward.pytestmark if m.name == "parametrize" for v in m.args[1]  # noqa: F821
               if m.args[0] == "model_name"]
    assert sorted(forward) == sorted(_SELECTED)
    # from the source: some of timm's tests are defined only outside GitHub Actions
    timm_tests = re.findall(r"^\s*def (test_\w+)\(", Path(_TIMM_TESTS.__file__).read_text(), flags=re.M)
    for test, model, reason in EXCLUDE:
        assert fnmatch.filter(timm_tests, test), f"EXCLUDE names a test timm does not have: {test!r}"
        assert fnmatch.filter(hub_models(), model), f"EXCLUDE names no hub model: {model!r}"
        assert reason


def test_ci_models_cover_every_family_once():
    hub = hub_models()
    assert sorted(hub[m] for m in CI_MODELS) == sorted(set(hub.values()))
