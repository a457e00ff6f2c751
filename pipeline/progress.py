"""Terminal progress for long stages: samples done / total and the rate (tqdm)."""

from __future__ import annotations

import sys
from types import TracebackType


class Progress:
    """A tqdm bar on stderr counted in samples (done / total, rate); a no-op when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "sample"):
        self.total = total
        self.desc = desc
        self.done = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                             mininterval=0.5, dynamic_ncols=True)  # fmt: skip

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if self._bar is not None:
            self._bar.close()
