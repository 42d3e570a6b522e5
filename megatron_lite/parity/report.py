"""The parity report: per layout, what was compared with the reference run and every way it differed.

Four things are compared with one process on the same global batches:

- the training pass's loss at every step (``tolerance``, 1e-5 in fp32): the trajectory, optimizer and all;
- the frozen pass's loss and gradient norm at every step, from the shared initial weights (``frozen.py``);
- every rank's piece of every gradient in the frozen pass, against the same box of the reference's gradient
  (``grad_rtol``, relative to the tensor's norm; ``gradients.py``), with every element of every tensor covered;
- the structure each rank built, against what the layout's name says (``structure.py``).

The training pass's gradient norm is shown but not compared: after a few AdamW steps it drifts on correct layouts
(updates of up to the learning rate per near-zero element), while the frozen pass compares it from the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from megatron_lite.parity.gradients import GRAD_RTOL, TensorDiff, worst

LOSS_TOLERANCE = 1e-5


def _max_abs_diff(ref: list[float] | None, got: list[float] | None) -> float:
    if ref is None or got is None or len(ref) != len(got):
        return math.inf
    return max((abs(a - b) if a == a and b == b else math.inf for a, b in zip(ref, got)), default=0.0)


def _max_rel_diff(ref: list[float] | None, got: list[float] | None) -> float:
    if ref is None or got is None or len(ref) != len(got):
        return math.inf
    return max((abs(a - b) / max(abs(a), 1e-30) if a == a and b == b else math.inf for a, b in zip(ref, got)),
               default=0.0)


@dataclass
class ParityReport:
    """Per layout: training losses and gradient norms, frozen-pass losses, norms and per-tensor differences,
    structure errors; and the layouts that failed to run."""

    steps: int
    losses: dict[str, list[float]]
    errors: dict[str, str]
    seconds: dict[str, float]
    grad_norms: dict[str, list[float]] = field(default_factory=dict)
    reference: str = "single"
    frozen_losses: dict[str, list[float]] = field(default_factory=dict)
    frozen_norms: dict[str, list[float]] = field(default_factory=dict)
    tensors: dict[str, list[list[TensorDiff]]] = field(default_factory=dict)  # per frozen step: every rank's pieces
    gaps: dict[str, list[str]] = field(default_factory=dict)  # tensors whose elements no piece covered
    structure: dict[str, list[str]] = field(default_factory=dict)
    holdings: dict[str, list[dict]] = field(default_factory=dict)  # per layout, per rank: what it built

    def max_abs_diff(self, name: str) -> float:
        """Largest |loss - reference loss| over the training steps."""
        return _max_abs_diff(self.losses.get(self.reference), self.losses.get(name))

    def frozen_loss_diff(self, name: str) -> float:
        """Largest |loss - reference loss| over the frozen steps."""
        return _max_abs_diff(self.frozen_losses.get(self.reference), self.frozen_losses.get(name))

    def frozen_norm_diff(self, name: str) -> float:
        """Largest relative difference of the gradient norm from the reference's over the frozen steps."""
        return _max_rel_diff(self.frozen_norms.get(self.reference), self.frozen_norms.get(name))

    def worst_tensor(self, name: str) -> tuple[int, TensorDiff] | None:
        """(1-based frozen step, piece) with the largest relative difference from the reference gradient."""
        found = [(k + 1, d) for k, diffs in enumerate(self.tensors.get(name, [])) if (d := worst(diffs))]
        return max(found, key=lambda x: x[1].relative, default=None)

    def max_tensor_diff(self, name: str) -> float:
        found = self.worst_tensor(name)
        return found[1].relative if found else (0.0 if name == self.reference else math.inf)

    def problems(self, name: str, tolerance: float = LOSS_TOLERANCE, grad_rtol: float = GRAD_RTOL) -> list[str]:
        """Each way layout ``name`` failed, one line each; [] when it passed."""
        if name in self.errors:
            return [f"failed to run: {self.errors[name]}"]
        out = [f"structure: {e}" for e in self.structure.get(name, [])]
        if name == self.reference:
            return out
        if (d := self.max_abs_diff(name)) > tolerance:
            out.append(f"training loss differs by {d:.2e} (tolerance {tolerance:g})")
        if self.frozen_losses.get(self.reference) is None:
            return out + ["no reference gradients: the reference run did not record them"]
        if (d := self.frozen_loss_diff(name)) > tolerance:
            out.append(f"frozen-pass loss differs by {d:.2e} (tolerance {tolerance:g})")
        if (d := self.frozen_norm_diff(name)) > grad_rtol:
            out.append(f"gradient norm differs by {d:.2e} relative (tolerance {grad_rtol:g})")
        found = self.worst_tensor(name)
        if found is None:
            out.append("no gradient pieces were compared")
        elif found[1].relative > grad_rtol:
            bad = sum(1 for diffs in self.tensors[name] for x in diffs if x.relative > grad_rtol)
            out.append(f"worst tensor at frozen step {found[0]}: {found[1].describe()} (tolerance {grad_rtol:g}; "
                       f"{bad} piece(s) over it)")
        out += self.gaps.get(name, [])
        return out

    def failures(self, tolerance: float = LOSS_TOLERANCE, grad_rtol: float = GRAD_RTOL) -> list[str]:
        """Layouts that failed to run or differ from the reference in any compared quantity."""
        names = list(self.losses) + [n for n in self.errors if n not in self.losses]
        return [n for n in names if self.problems(n, tolerance, grad_rtol)]

    def markdown(self, tolerance: float = LOSS_TOLERANCE, grad_rtol: float = GRAD_RTOL) -> str:
        """One row per layout: the largest differences from the reference, and the tensor where the gradient
        differed most (for docs/benchmarks.md)."""
        rows = ["| layout | ranks | loss (train) | loss (frozen) | grad norm (rel) | worst tensor (rel) | where |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for n in self.losses:
            if n == self.reference:
                continue
            found = self.worst_tensor(n)
            where = f"`{found[1].name}`, rank {found[1].rank}, step {found[0]}" if found else "-"
            verdict = "" if not self.problems(n, tolerance, grad_rtol) else " (FAILED)"
            ranks = len(self.holdings.get(n, [])) or "-"
            rows.append(f"| {n}{verdict} | {ranks} | {self.max_abs_diff(n):.1e} | {self.frozen_loss_diff(n):.1e} | "
                        f"{self.frozen_norm_diff(n):.1e} | {self.max_tensor_diff(n):.1e} | {where} |")
        return "\n".join(rows)

    def table(self, tolerance: float = LOSS_TOLERANCE, grad_rtol: float = GRAD_RTOL) -> str:
        names = list(self.losses) + [n for n in self.errors if n not in self.losses]
        width = max(14, *(len(n) + 2 for n in names))

        def row(label: str, cell: Callable[[str], str]) -> str:
            return f"{label:<6}" + "".join(f"{cell(n):>{width}}" for n in names)

        def fmt(value: Callable[[str], float]) -> Callable[[str], str]:
            return lambda n: "-" if n in self.errors or n == self.reference else f"{value(n):.2e}"

        lines = [row("step", lambda n: n)]
        for i in range(self.steps):
            got = self.losses
            lines.append(row(f"{i + 1:>4}", lambda n: f"{got[n][i]:.6f}" if n in got and i < len(got[n]) else "-"))
        lines.append(row("loss|", fmt(self.max_abs_diff)))
        if self.frozen_losses:
            lines.append(row("fro|", fmt(self.frozen_loss_diff)))
            lines.append(row("norm|", fmt(self.frozen_norm_diff)))
            lines.append(row("grad|", fmt(self.max_tensor_diff)))
        lines.append(row("sec", lambda n: f"{self.seconds.get(n, 0.0):.1f}"))
        lines.append(row("", lambda n: "FAILED" if self.problems(n, tolerance, grad_rtol) else "ok"))
        lines.append("(loss|: largest |loss - single| over the training steps; fro|: the same over the frozen steps, "
                     "at the initial weights; norm|: largest relative difference of the gradient norm there; grad|: "
                     "largest relative difference of any rank's piece of any gradient there)")
        for n in names:
            for problem in self.problems(n, tolerance, grad_rtol):
                lines.append(f"{n}: {problem}")
        return "\n".join(lines)
