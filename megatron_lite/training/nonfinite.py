"""Non-finite steps and loss spikes: what the loop does with a NaN, an inf or a sudden jump of the loss.

A NaN or inf gradient norm makes the engine skip the optimizer step and drop the step's gradients (every engine's
norm is global, so every rank takes the same decision); a non-finite loss gives non-finite gradients, so it is
skipped the same way. The loop logs each skipped step, and after ``training.max_skipped_steps`` of them in a row it
stops with :class:`NonFiniteError`, keeping the last checkpoint written before the trouble: the weights are not
damaged (no step was applied), but the data or the settings are, and saving again would only move the data position
past the batches that caused it.

A loss above ``training.loss_spike_factor`` times the mean of the recent finite losses is logged as a spike; it is
only a warning, the step is kept. The losses compared are the step losses, which are identical on every rank.
"""

from __future__ import annotations

import math
from collections import deque

from megatron_lite.errors import NonFiniteError

__all__ = ["NonFiniteError", "StepHealth"]


SPIKE_WINDOW = 20  # finite losses in the running mean
SPIKE_MIN_HISTORY = 5  # losses needed before spikes are looked for


class StepHealth:
    """Counts consecutive skipped steps and watches for loss spikes; returns the line to log, if any."""

    def __init__(self, max_skipped_steps: int, spike_factor: float) -> None:
        self.max_skipped = max_skipped_steps
        self.spike_factor = spike_factor
        self.skipped_in_row = 0
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def check(self, step: int, loss: float, grad_norm: float, skipped: bool) -> tuple[str, str] | None:
        """Account for one finished step: None, or (event, line) to log (``skipped_step`` or ``loss_spike``);
        raise :class:`NonFiniteError` when too many steps were skipped in a row."""
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped or nonfinite:
            self.skipped_in_row += 1
            if self.max_skipped and self.skipped_in_row > self.max_skipped:
                raise NonFiniteError(
                    f"{self.skipped_in_row} steps in a row were skipped (last: step {step}, loss {loss}, grad norm "
                    f"{grad_norm}), more than training.max_skipped_steps={self.max_skipped}; stopping and keeping "
                    "the last checkpoint: lower optimizer.lr, check the data, or use bf16 instead of fp16"
                )
            what = "skipped the optimizer step" if skipped else "non-finite, but this engine applied the step"
            return "skipped_step", (
                f"step {step}: {what} (loss {loss}, grad norm {grad_norm}); {self.skipped_in_row} in a row"
            )
        self.skipped_in_row = 0
        line = None
        if self.spike_factor > 0 and len(self.recent) >= SPIKE_MIN_HISTORY:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                line = "loss_spike", (
                    f"step {step}: loss spike: {loss:.4f} is {loss / mean:.1f}x the mean of the last "
                    f"{len(self.recent)} steps ({mean:.4f}; training.loss_spike_factor={self.spike_factor})"
                )
        self.recent.append(loss)
        return line
