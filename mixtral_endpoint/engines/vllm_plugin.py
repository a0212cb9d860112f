"""A vLLM general plugin (its `vllm.general_plugins` entry point ships in vllm_plugin_metadata/, which
vllm_engine.py puts on sys.path): vLLM loads it in every process it starts. In those that our engine started
(vllm_engine.py marks them through the environment) it does two things:

- It ties the process to its parent: when the parent dies, the kernel kills it (PR_SET_PDEATHSIG). A worker that
  gunicorn or the kernel kills outright (its timeout, the OOM killer) must not leave vLLM's engine core holding
  its GPUs, which the fresh worker claims.
- It makes Flask's context-local proxies readable. vLLM's CPU build scans the globals of every loaded module for
  Triton kernels to replace; a child that vLLM spawns under azmlinfsrv imports Flask again, through azmlinfsrv's
  main module, and `flask.request` (and whoever imported it) raises "Working outside of application context"
  when read outside a request, which killed the engine core. A throwaway request context, pushed for the life of
  the process, which serves no Flask request, makes them readable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys

MARK = "MIXTRAL_ENDPOINT_VLLM"  # set by vllm_engine.py in its own process, so inherited by vLLM's children
_PR_SET_PDEATHSIG = 1


def in_engine_process() -> None:
    if MARK not in os.environ or multiprocessing.parent_process() is None:
        return  # not a child process, or not our engine's
    if sys.platform == "linux":
        ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the line above
            os._exit(1)
    if "flask" in sys.modules:
        import flask

        if not flask.has_request_context():
            flask.Flask(__name__).test_request_context().push()
