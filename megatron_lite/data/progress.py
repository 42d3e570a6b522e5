"""The preprocessing progress bar: position and total in one unit, so its ETA means something.

The position comes from the readers (bytes of the input files as stored, or records of a dataset; see
:class:`~megatron_lite.data.records.SourceStats`), never from characters of decoded text, which would end short of a
total in bytes for multi-byte text, JSON syntax or ``.gz`` input. With no total (a streamed dataset of unknown size)
the bar shows counts and rates but no ETA.
"""

from __future__ import annotations

import sys
import time


class PreprocessProgress:
    """A tqdm bar at ``done`` of ``total`` ``unit``, with docs/s and tokens/s beside it; a no-op when disabled."""

    def __init__(self, total: int | None, unit: str, enabled: bool = True) -> None:
        self._t0 = time.perf_counter()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, unit_scale=True, desc="tokenizing", file=sys.stderr,
                             dynamic_ncols=True, smoothing=0.1)

    @property
    def position(self) -> int:
        return 0 if self._bar is None else int(self._bar.n)

    def update(self, done: int, documents: int, tokens: int) -> None:
        """Move to ``done`` (never backwards) and refresh the rates."""
        if self._bar is None:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        self._bar.set_postfix_str(f"{documents / dt:,.0f} docs/s, {tokens / dt:,.0f} tok/s", refresh=False)
        self._bar.update(max(0, done - self._bar.n))

    def close(self, keep: bool = True) -> None:
        """Finish the bar; ``keep=False`` erases it, so a failed run ends with its one-line error alone."""
        if self._bar is not None:
            self._bar.leave = keep
            self._bar.close()
