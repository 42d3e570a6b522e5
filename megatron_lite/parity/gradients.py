"""Per-tensor gradient parity: every rank's piece of every gradient against the same box of one process's gradient.

Losses and the global gradient norm barely move when one small tensor's gradient has the wrong scale (a norm weight
summed instead of averaged over a tensor-parallel group, a tied copy counted twice): AdamW normalizes each element's
update, and a small tensor is a tiny share of the norm. So each rank reports the gradient of every parameter it holds
(``Engine.gradient_pieces``: a TP shard, an FSDP shard, a ZeRO partition assembled, a stage's tensors, a tied or
replicated copy), and each piece is compared with the matching box of the single-process gradient. A replicated
tensor is compared on every rank that holds it, so a bug on one rank's copy shows.

The measure of a piece is ``|piece - reference box| / |reference tensor|`` (L2 norms): a relative error of the whole
tensor, so near-zero elements do not inflate it, while a wrong scale on any piece moves it by the piece's share of
the tensor. A tensor whose gradient is zero in exact arithmetic is rounding noise in every run (a key projection's
bias: softmax ignores what it adds), so the denominator is never below ``GRAD_FLOOR`` times the norm of the whole
reference gradient; a halved gradient is still caught on any tensor above 1e-7 of that norm. In fp32 on the CPU correct layouts stay below 1e-6 (the largest per layout: ``docs/benchmarks.md``,
"Parity"), so the tolerance of 1e-5 leaves a margin of ten, and five orders of magnitude below a halved tensor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_lite.engines.base import GradientPiece

GRAD_RTOL = 1e-5  # largest relative difference of any tensor's piece (and of the norm), fp32 on the CPU
GRAD_FLOOR = 1e-3  # the smallest denominator, as a share of the whole reference gradient's norm


@dataclass
class TensorDiff:
    """One rank's piece of one gradient against the reference: norms of the difference, the piece, the reference box
    and the whole reference tensor, or the problem that kept it from being compared."""

    name: str
    rank: int
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    diff: float = 0.0
    got: float = 0.0
    box: float = 0.0
    full: float = 0.0
    floor: float = 0.0  # GRAD_FLOOR x the norm of the whole reference gradient of this step
    problem: str = ""

    @property
    def relative(self) -> float:
        """|piece - reference box| / max(|reference tensor|, floor); infinite for a piece that could not be compared,
        or that is nonzero where the whole reference gradient is zero."""
        if self.problem:
            return math.inf
        scale = max(self.full, self.floor)
        if scale == 0.0:
            return 0.0 if self.diff == 0.0 else math.inf
        return self.diff / scale

    @property
    def scale(self) -> float:
        """|piece| / |reference box|: 0.5 for a halved gradient, 4 for one four times too large."""
        return self.got / self.box if self.box else math.nan

    def describe(self) -> str:
        box = ", ".join(f"{o}:{o + n}" for o, n in zip(self.offset, self.shape))
        where = f"{self.name}[{box}] on rank {self.rank}"
        if self.problem:
            return f"{where}: {self.problem}"
        return f"{where}: {self.scale:.3g}x the reference gradient, relative difference {self.relative:.2e}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TensorDiff":
        return cls(**{**d, "offset": tuple(d["offset"]), "shape": tuple(d["shape"])})


def compare_pieces(reference: dict[str, torch.Tensor], pieces: list[GradientPiece], rank: int) -> list[TensorDiff]:
    """Each piece against the same box of the reference gradient (full fp32 tensors by first name)."""
    floor = GRAD_FLOOR * math.sqrt(sum(float(t.double().square().sum()) for t in reference.values()))
    out = []
    for piece in pieces:
        shape = tuple(piece.grad.shape)
        diff = TensorDiff(piece.name, rank, tuple(piece.offset), shape, floor=floor)
        ref = reference.get(piece.name)
        if ref is None:
            diff.problem = "a gradient the reference run has no tensor for"
        elif tuple(ref.shape) != tuple(piece.full_shape):
            diff.problem = f"full shape {tuple(piece.full_shape)}, the reference's is {tuple(ref.shape)}"
        elif any(o < 0 or o + n > d for o, n, d in zip(piece.offset, shape, ref.shape)):
            diff.problem = f"box outside the tensor of shape {tuple(ref.shape)}"
        else:
            box = ref[tuple(slice(o, o + n) for o, n in zip(piece.offset, shape))].double()
            got = piece.grad.double()
            diff.diff, diff.got = float((got - box).norm()), float(got.norm())
            diff.box, diff.full = float(box.norm()), float(ref.double().norm())
        out.append(diff)
    return out


def coverage_gaps(shapes: dict[str, tuple[int, ...]], diffs: list[TensorDiff]) -> list[str]:
    """Tensors of the reference whose elements the ranks' pieces do not cover exactly once (identical boxes on
    several ranks are one box: replicas); one line each."""
    boxes: dict[str, set[tuple]] = {}
    for d in diffs:
        boxes.setdefault(d.name, set()).add((d.offset, d.shape))
    gaps = []
    for name, shape in shapes.items():
        covered = sum(math.prod(s) for _, s in boxes.get(name, ()))
        if covered != math.prod(shape):
            gaps.append(f"{name}: the ranks' gradient pieces cover {covered} of its {math.prod(shape)} elements")
    return gaps


def worst(diffs: list[TensorDiff]) -> TensorDiff | None:
    """The piece with the largest relative difference (ties: the first)."""
    return max(diffs, key=lambda d: d.relative, default=None)


# ----------------------------------------------------------------------------------------------------------------------
# The reference gradients, on disk between the reference run and the others (safetensors: no pickle)
# ----------------------------------------------------------------------------------------------------------------------


def write_reference(path: Path, steps: list[dict[str, torch.Tensor]]) -> None:
    """One process's full gradients of each checked step, as ``<step>/<name>`` tensors."""
    from safetensors.torch import save_file

    save_file({f"{k}/{name}": g.contiguous() for k, grads in enumerate(steps) for name, g in grads.items()}, str(path))


def read_reference(path: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    steps: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        k, _, name = key.partition("/")
        steps.setdefault(int(k), {})[name] = value
    return [steps[k] for k in sorted(steps)]


def full_gradients(pieces: list[GradientPiece]) -> dict[str, torch.Tensor]:
    """The pieces of a rank that holds every tensor whole (one process) as full gradients by name."""
    out = {}
    for p in pieces:
        if tuple(p.grad.shape) != tuple(p.full_shape):
            raise ValueError(f"{p.name}: the reference run must hold whole tensors, got a piece of {tuple(p.grad.shape)}"
                             f" of {tuple(p.full_shape)}")
        out[p.name] = p.grad
    return out


def save_pieces(path: Path, pieces: list[GradientPiece]) -> None:
    """A rank's gradient pieces as safetensors, their names and boxes in the header."""
    import json

    from safetensors.torch import save_file

    boxes = [{"name": p.name, "full_shape": list(p.full_shape), "offset": list(p.offset)} for p in pieces]
    save_file({str(i): p.grad.contiguous() for i, p in enumerate(pieces)}, str(path),
              metadata={"pieces": json.dumps(boxes)})


def load_pieces(path: Path) -> list[GradientPiece]:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        boxes = json.loads(f.metadata()["pieces"])
        return [GradientPiece(b["name"], tuple(b["full_shape"]), tuple(b["offset"]), f.get_tensor(str(i)))
                for i, b in enumerate(boxes)]
