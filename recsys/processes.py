"""Child processes that do not outlive their parent, and how to see which are left.

A pool worker blocked waiting for its next task keeps running after its parent is killed with
SIGKILL, holding its memory, until someone kills it. `exit_with_parent`, called first thing in the
child (a pool initializer), asks Linux to SIGKILL the child when its parent dies
(`prctl(PR_SET_PDEATHSIG)`); elsewhere a daemon thread polls the parent PID once a second.
`descendants` and `is_running` tell what still runs below a process (the kill tests, the fault
benchmark).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
"""prctl option: the signal this process gets when its parent dies (linux/prctl.h)."""


def exit_with_parent(parent_pid: int) -> None:
    """Make this process end when `parent_pid`, its parent, dies, however it dies.

    Linux sends the signal when the *thread* that started the child ends: call this in children
    started by a thread that lives as long as they are needed (a pool owned by the main thread).
    """
    linux = sys.platform.startswith("linux")
    if not linux or ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="exit-with-parent", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the request was made: nobody would signal
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def descendants(pid: int) -> set[int]:
    """Every running process below `pid` (Linux /proc; zombies, dead but not yet reaped, excluded)."""
    children: dict[int, list[int]] = {}
    for folder in Path("/proc").glob("[0-9]*"):
        found = _state_and_parent(int(folder.name))
        if found is not None and found[0] != "Z":
            children.setdefault(found[1], []).append(int(folder.name))
    result, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            result.add(child)
            frontier.append(child)
    return result


def is_running(pid: int) -> bool:
    """Whether process `pid` runs (Linux /proc; a zombie does not)."""
    found = _state_and_parent(pid)
    return found is not None and found[0] != "Z"


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the command may hold spaces
    except OSError:
        return None  # exited meanwhile
    return fields[0], int(fields[1])
