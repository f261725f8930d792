"""What ``train.py`` and ``eval.py`` share around the Hydra job: run folders that no two runs share, expected user
errors as one line on stderr (exit status 1; the traceback with ``HYDRA_FULL_ERROR=1``, as Hydra users expect), and
Lightning's log lines and Python warnings in the run's log file (``train.log`` / ``eval.log``)."""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys
from typing import Any, Callable, Set

from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .callbacks import DivergenceError

__all__ = ["unique_dir", "owns_run_dir", "remove_run_dir", "run_job", "USER_ERRORS"]

log = logging.getLogger(__name__)

# errors that mean "fix the command line, the config or the files", not "bug": reported in one line
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               DivergenceError, MissingMandatoryValue, InstantiationException)

_CREATED: Set[str] = set()  # run folders this process created through unique_dir


def unique_dir(base: str) -> str:
    """Create and return a run folder no other run uses: ``base``, else ``base_1``, ``base_2``, ... (the first name
    whose exclusive creation succeeds; ``os.mkdir`` fails atomically on an existing folder, so runs started in the
    same second, in two terminals or by a sweep script, each get their own). Used as ``${unique_dir:...}`` in
    ``hydra.run.dir`` / ``hydra.sweep.dir``; the resolver is cached, so one config resolves to one folder."""
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    for i in itertools.count():
        path = base if i == 0 else f"{base}_{i}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        _CREATED.add(os.path.abspath(path))
        return path
    raise AssertionError("unreachable")


def owns_run_dir(path: str) -> bool:
    """Whether ``path`` is a run folder this process created (or a sweep job's folder inside one)."""
    path = os.path.abspath(path)
    return path in _CREATED or os.path.dirname(path) in _CREATED


def remove_run_dir(path: str) -> None:
    """Remove the folder of a run that failed before its first step, if this process created it (a folder given
    with ``hydra.run.dir=`` may hold earlier work: it stays)."""
    if owns_run_dir(path):
        shutil.rmtree(path, ignore_errors=True)
        _CREATED.discard(os.path.abspath(path))


OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)


def _route_logs() -> None:
    """Send Lightning's messages and Python warnings through the root logger, whose handlers Hydra configured
    (console + ``<job>.log``). Lightning gives its loggers a handler of their own and stops propagation when it is
    imported before logging is configured, which left the log file empty."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)
        lg.propagate = True
    logging.captureWarnings(True)


def _message(e: BaseException) -> str:
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return str(e).strip() or type(e).__name__


def run_job(task: Callable[[Any], Any], cfg: Any) -> Any:
    """Run ``task(cfg)`` inside a Hydra job; an expected user error prints one line and exits with status 1."""
    _route_logs()
    try:
        return task(cfg)
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        msg = f"Error: {_message(e)}"
        # into the log file only (the console gets it on stderr below, once)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, None)
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(record)
        print(msg, file=sys.stderr, flush=True)
        sys.exit(1)
