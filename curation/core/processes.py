"""Processes that must not outlive the one that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (a pool initializer; `parent_pid` is the parent's pid).

    A `kill -9` of the parent gives it no chance to stop its pool; the kernel does it
    (Linux `prctl(PR_SET_PDEATHSIG)`). The signal follows the thread that started this
    process, which for a multiprocessing pool lives as long as the pool.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl
        os._exit(1)
