"""How worker processes start: from a fork server on Linux, spawned elsewhere.

A spawned worker starts a Python of its own and imports numpy, OpenCV, onnxruntime and idc (~0.4 s and ~0.6 s of
CPU each on a 2-core machine), after idc-infer's own process has done the same. On Linux idc-infer starts a fork
server as it starts (``start``), before its own imports: the server imports those modules once, on a core the
start-up leaves idle, and forks each worker ready to load the model; the workers share the server's imported
pages, so their memory counted once (PSS) is lower too. Nothing else changes: the same initializer, the same
tasks and outputs, Ctrl-C ignored in the workers, and each worker still ends when idc-infer's process does.

This module stays light (no numpy): idc-infer imports it before anything heavy.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

# what the fork server imports once for every worker (a missing one is skipped: its worker imports it itself)
PRELOAD = ["idc_infer.processes", "idc_infer.review", "onnxruntime"]
# the server's and the workers' BLAS runs one thread: a worker is one thread of CPU work (and forks no BLAS pool)
_SERVER_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def uses_fork_server() -> bool:
    """Whether worker processes start from a fork server here: on Linux (macOS and Windows spawn them)."""
    return sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods()


def cores() -> int:
    """The cores this process may run on: more worker processes than that only add memory (each runs one thread
    of CPU work and holds its own interpreter, libraries and model: ~50-60 MB of PSS)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context worker processes start from (start() first, where it can)."""
    if uses_fork_server():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def start() -> bool:
    """Start the fork server now (it imports PRELOAD in the background), if this platform uses one and it is not
    running yet; False where it cannot (the workers are then spawned as they start)."""
    if not uses_fork_server() or cores() < 2:  # one core: the run keeps its threads
        return False
    worker_context()  # sets the preload list
    import multiprocessing.forkserver

    try:
        with sigint_ignored(), _environment(_SERVER_ENVIRONMENT):
            multiprocessing.forkserver.ensure_running()
    except OSError as exc:  # no more processes allowed, no socket
        log.debug("fork server not started (%s): workers will start without it", exc)
        return False
    return True


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while processes are started: an ignored signal stays ignored in a spawned process (and in
    the fork server's children), whose Python then installs no KeyboardInterrupt of its own (a Ctrl-C while a
    worker imports would print its traceback). Only the main thread can change it; elsewhere the workers'
    initializer does it a moment later."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler set outside Python, which could not be put back)
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in the environment a process started in this block inherits (a user's own setting wins)."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
