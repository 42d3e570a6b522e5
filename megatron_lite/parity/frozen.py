"""The frozen-weights pass: every layout's gradients at the same weights, step after step, before it trains.

Comparing gradients during training cannot tell a bug from optimizer noise: AdamW turns ulp-level differences in
near-zero gradients into update differences of up to the learning rate per element, so correct layouts drift apart
within ten steps while a wrong scale on one small tensor hides in the noise. So, before training, each rank runs the
first ``steps`` global batches at learning rate 0: the real step (forward, backward, reduction, norm, clipping and an
optimizer step that changes no weight), with the gradients read where they are final and unclipped
(``Engine.on_gradients``). Every step of this pass starts from the initial weights, which every layout shares byte
for byte, so each step's gradients must match one process's to reduction order. Afterwards the optimizer state, the
engine's extra state (a loss scale) and the RNG states are put back, so the training pass that follows is the one a
run without the check would make.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_lite.parity.gradients import compare_pieces, full_gradients, read_reference, save_pieces, \
    write_reference

if TYPE_CHECKING:
    from megatron_lite.training.trainer import Trainer


@dataclass(frozen=True)
class GradientCheck:
    """What the frozen pass of one run does: how many steps, and where the reference gradients are read or written."""

    steps: int
    reference: str | None = None  # compare with the gradients written here by the reference run
    write_reference: str | None = None  # this run is the reference (one process): write its full gradients here
    keep_pieces: str | None = None  # a directory: each rank writes its pieces of the first step there


def frozen_pass(trainer: "Trainer", check: GradientCheck, rank: int) -> dict:
    """Run ``check.steps`` steps at learning rate 0 on the first global batches; return each step's loss, gradient
    norm and per-tensor differences from the reference (JSON-safe)."""
    from megatron_lite.data import GlobalBatchLoader
    from megatron_lite.training.checkpoint import rng_state, set_rng_state

    engine, topo, cfg = trainer.engine, trainer.topology, trainer.cfg
    if trainer.step:
        raise ValueError(f"the gradient check compares from the initial weights, but this run resumed at step "
                         f"{trainer.step}; start it in a new checkpoint directory")
    rng, extra = rng_state(), engine.extra_state()
    reference = read_reference(Path(check.reference)) if check.reference else None
    loader = GlobalBatchLoader(trainer.datasets["train"], trainer.global_batch, cfg.training.micro_batch_size,
                               topo.dp_rank, topo.dp, 0, prefetch=0)
    pieces: list = []
    engine.on_gradients = lambda: pieces.extend(engine.gradient_pieces())
    out: dict = {"losses": [], "grad_norms": [], "tensors": []}
    written = []
    try:
        for k, microbatches in zip(range(check.steps), loader):
            pieces.clear()
            metrics = engine.train_step(microbatches, lr=0.0)
            out["losses"].append(metrics.loss)
            out["grad_norms"].append(metrics.grad_norm)
            if reference is not None:
                out["tensors"].append([d.to_json() for d in compare_pieces(reference[k], pieces, rank)])
            if check.write_reference:
                written.append(full_gradients(pieces))
            if check.keep_pieces and k == 0:
                save_pieces(Path(check.keep_pieces) / f"rank{rank}.safetensors", pieces)
    finally:
        engine.on_gradients = None
    if written and rank == 0:
        write_reference(Path(check.write_reference), written)
    engine.reset_optimizer_state()
    engine.load_extra_state(extra)
    set_rng_state(rng)
    return out
