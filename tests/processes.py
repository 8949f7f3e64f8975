"""Child processes of a process under test, from Linux's /proc: which exist, and whether one still runs."""
from __future__ import annotations

from pathlib import Path


def child_pids(parent: int, marker: bytes, exclude: bytes = b"resource_tracker") -> list[int]:
    """Pids of the processes that ``parent`` started whose command line holds ``marker`` (and not ``exclude``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and marker in cmdline and exclude not in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
