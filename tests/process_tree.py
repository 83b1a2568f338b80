"""Which processes descend from a process, and whether one still runs (Linux /proc); for kill tests."""

from __future__ import annotations

from pathlib import Path


def _state_and_parent(pid_dir: Path) -> tuple[str, int] | None:
    try:
        fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()  # after the command, which may hold spaces
    except OSError:
        return None  # exited meanwhile
    return fields[0], int(fields[1])


def descendants(pid: int) -> set[int]:
    """Every live (not zombie) process below `pid`."""
    children: dict[int, list[int]] = {}
    for pid_dir in Path("/proc").glob("[0-9]*"):
        found = _state_and_parent(pid_dir)
        if found is not None and found[0] != "Z":
            children.setdefault(found[1], []).append(int(pid_dir.name))
    result, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            result.add(child)
            frontier.append(child)
    return result


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    found = _state_and_parent(Path(f"/proc/{pid}"))
    return found is not None and found[0] != "Z"
