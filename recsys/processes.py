"""Child processes that do not outlive their parent.

A pool worker blocked waiting for its next task keeps running after its parent is killed with
SIGKILL, holding its memory, until someone kills it. `exit_with_parent`, called first thing in the
child (a pool initializer), asks Linux to SIGKILL the child when its parent dies
(`prctl(PR_SET_PDEATHSIG)`); elsewhere a daemon thread polls the parent PID once a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
"""prctl option: the signal this process gets when its parent dies (linux/prctl.h)."""


def exit_with_parent(parent_pid: int) -> None:
    """Make this process end when `parent_pid`, its parent, dies, however it dies.

    Linux sends the signal when the *thread* that started the child ends: call this in children
    started by a thread that lives as long as they are needed (a pool owned by the main thread).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="exit-with-parent", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the request was made: nobody would signal
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)
