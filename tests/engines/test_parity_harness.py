"""The parity harness is a check only if it fails: planted bugs in gradients, in the code and in the structure are
caught and named, and the frozen-weights pass leaves the training pass it precedes unchanged, bit for bit."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from megatron_lite.engines.base import GradientPiece
from megatron_lite.parity import (
    GRAD_RTOL,
    GradientCheck,
    ParityReport,
    check_structure,
    compare_layouts,
    compare_pieces,
    load_pieces,
    parse_layout,
    read_reference,
    run_layout,
)


@pytest.fixture(scope="module")
def tp2_pieces(tiny_config, tmp_path_factory):
    """A passing tp2 comparison, with each rank's gradient pieces of the first step and the reference kept."""
    keep = tmp_path_factory.mktemp("pieces")
    report = compare_layouts(tiny_config, ["tp2"], steps=1, keep_pieces=str(keep))
    assert report.failures() == [], report.table()
    reference = read_reference(keep / "reference.safetensors")[0]
    return report, reference, [load_pieces(keep / "tp2" / f"rank{r}.safetensors") for r in range(2)]


def _planted(report: ParityReport, reference, ranks: list[list[GradientPiece]], plant) -> ParityReport:
    """The report with tp2's first step replaced by a comparison of the pieces after ``plant(rank, piece)``."""
    planted = copy.deepcopy(report)
    diffs = []
    for rank, pieces in enumerate(ranks):
        changed = [dataclasses.replace(p, grad=plant(rank, p)) for p in pieces]
        diffs += compare_pieces(reference, changed, rank)
    planted.tensors["tp2"] = [diffs]
    return planted


@pytest.mark.parametrize(
    "what, plant, named, scale",
    [
        # a small replicated tensor, on one of the two ranks that hold it
        ("x0.5 on one norm weight", lambda r, p: p.grad * (0.5 if r == 1 and p.name == "layers.1.mlp_norm.weight"
                                                            else 1.0), "layers.1.mlp_norm.weight", 0.5),
        # one rank's shard of a split tensor
        ("x2 on one TP shard", lambda r, p: p.grad * (2.0 if r == 0 and p.name == "layers.0.attn.q_proj.weight"
                                                       else 1.0), "layers.0.attn.q_proj.weight", 2.0),
        # a sum where an average belongs, over every tensor
        ("x4 on everything", lambda r, p: p.grad * 4.0, None, 4.0),
    ],
)
def test_planted_gradient_bugs_are_caught_and_named(tp2_pieces, what, plant, named, scale):
    report, reference, ranks = tp2_pieces
    assert report.max_tensor_diff("tp2") < GRAD_RTOL  # the copy before planting passes
    planted = _planted(report, reference, ranks, plant)
    assert planted.failures() == ["tp2"], what
    step, worst = planted.worst_tensor("tp2")
    if named:
        assert worst.name == named and f"{named}[" in "\n".join(planted.problems("tp2"))
    assert worst.scale == pytest.approx(scale, rel=1e-3)
    assert f"{scale:.3g}x the reference gradient" in "\n".join(planted.problems("tp2"))
    unplanted = _planted(report, reference, ranks, lambda r, p: p.grad)
    assert unplanted.failures() == []


def test_a_bug_in_the_code_that_the_losses_miss_is_caught(tiny_config, monkeypatch):
    """Sequence parallelism without the sum of the norms' gradient parts over the tensor-parallel group: each rank
    updates its norm weights from its own half of the sequence. Over 2 steps the losses stay within 1e-5 of one
    process; the per-tensor check names a norm weight. (Forked ranks inherit the patched module.)"""
    from megatron_lite.parallel.plans import SequenceShardedParams

    def unsummed(self, *args, **kwargs):  # the norm runs on its sequence shard with its own parameters
        return super(SequenceShardedParams, self).forward(*args, **kwargs)

    monkeypatch.setattr(SequenceShardedParams, "forward", unsummed)
    report = compare_layouts(tiny_config, ["tp2-sp"], steps=2)
    assert report.max_abs_diff("tp2-sp") < 1e-5  # what the loss-only check saw
    assert report.failures() == ["tp2-sp"]
    _, worst = report.worst_tensor("tp2-sp")
    assert worst.name.endswith("norm.weight") and worst.relative > 0.1, worst.describe()


def test_structure_check_sees_a_dropped_axis(tiny_config, tmp_path):
    """What a ddp2 run builds is not tp2 or pp2, though it trains exactly like one process; the tp2 run's own
    report passes, and one rank claiming a whole split tensor is named."""
    ddp = run_layout("ddp2", tiny_config, ["training.train_steps=1"]).holdings
    assert check_structure(parse_layout("ddp2"), ddp) == []
    as_tp = check_structure(parse_layout("tp2"), ddp)
    assert "rank 0: tp=1, the layout says 2" in as_tp
    as_pp = check_structure(parse_layout("pp2"), ddp)
    assert any("pipeline stages [0] of 1, expected [0] of 2" in e for e in as_pp), as_pp
    tp = run_layout("tp2", tiny_config, ["training.train_steps=1"]).holdings
    assert check_structure(parse_layout("tp2"), tp) == []
    whole = copy.deepcopy(tp)
    full, _ = whole[1]["params"]["layers.2.mlp.up_proj.weight"]
    whole[1]["params"]["layers.2.mlp.up_proj.weight"] = [full, full]
    errors = check_structure(parse_layout("tp2"), whole)
    assert errors and all("layers.2.mlp.up_proj.weight" in e for e in errors), errors


@pytest.mark.parametrize("layout, extra", [
    ("zero2", ["training.precision=bf16"]), ("zero3", []), ("fsdp2", []), ("zero0-pp2-1f1b", []),
    ("pp2-interleaved", []),
])
def test_frozen_pass_leaves_the_training_pass_unchanged(tiny_config, layout, extra):
    """Learning rate 0 changes no weight, and the optimizer state, loss scale and RNG are put back after it."""
    run = [*extra, "training.train_steps=3", "training.global_batch_size=16", "training.micro_batch_size=4"]
    plain = run_layout(layout, tiny_config, run).losses
    checked = run_layout(layout, tiny_config, run, check=GradientCheck(3))
    assert checked.losses == plain
    assert len(checked.frozen[0]["losses"]) == 3
