"""Peak memory of a process, as the kernel keeps it: ``VmHWM`` in ``/proc/<pid>/status``.

``ru_maxrss`` is not used: it survives fork+exec, so a child of a large process reports the
parent's size (three steps of bench/scale.py showed exactly 0.499 GiB at 1M that way).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def peak_gib(pid: int | str = "self") -> float:
    """A process's peak resident set, in GiB; 0 once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class Peaks:
    """The largest VmHWM seen, per process kind, among ``roots`` and their descendants, polled every
    second (a poll costs CPU the measured work would otherwise have: 0.2 s took a third of a core).
    ``kind(process, is_first_root)`` names a process's kind, or None to leave it out."""

    def __init__(self, roots: list[int], kind: Callable[[Any, bool], str | None]):
        self.roots, self.kind, self.peaks, self.done = roots, kind, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self.done.is_set():
            for root in self.roots:
                try:
                    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        kind = self.kind(p, p.pid == self.roots[0])
                    except psutil.Error:
                        continue
                    if kind is not None:
                        self.peaks[kind] = max(self.peaks.get(kind, 0.0), peak_gib(p.pid))
            self.done.wait(1.0)

    def __enter__(self) -> Peaks:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
