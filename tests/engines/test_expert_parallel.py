"""Mixture-of-experts models train exactly like one process under expert parallelism (experts split over ep of the
data-parallel ranks, tokens dispatched by all-to-all) beside DDP, FSDP2, TP, PP and DeepSpeed ZeRO 1-2, and under
DeepSpeed without ep; every tensor's gradient compared by the parity harness over 4 training steps."""

from __future__ import annotations

import pytest

from megatron_lite.parity import compare_layouts, run_layout

from tests.engines.conftest import assert_layouts_match, assert_refused_in_one_line

TOLERANCE = 1e-5
STEPS = 4  # training steps (warm-up, then the decay), after the frozen-weights pass's 4 steps
# Two microbatches per step at dp 2 (ep2), one at dp 4: each costs two all-to-alls per layer, in two layers (every
# layer runs the same code and one feeds the next; with model.moe.every=2, one dense layer and one mixture).
RUN = ["training.global_batch_size=16", "training.micro_batch_size=4", "training.eval_samples=16", "model.num_layers=2"]
SIGMOID_SHARED = ["model.moe.router=sigmoid", "model.moe.shared_experts=1", "model.moe.shared_expert_gate=true",
                  "model.moe.every=2"]
# The balancing bias moves by +-rate on the sign of (mean load - load): a routing choice that flips between
# near-tied experts under other dense numerics (tensor parallelism's partial sums) moves it by a whole step, so the
# bias is run where the dense parts compute alike; tp2ep2 runs the same router without it.
WITH_BIAS = [*SIGMOID_SHARED, "model.moe.bias_update_rate=0.01", "model.moe.aux_loss_coef=0.0"]


@pytest.mark.parametrize(
    "variant, extra, layouts",
    [
        ("softmax router, balancing and z-loss, no shared expert", [],
         ["ep2", "ep4", "ddp4-ep2", "fsdp2-ep2", "tp2ep2", "ep2pp2-1f1b", "ep2cp2", "zero1", "zero1-ep2", "zero2-ep2"]),
        ("sigmoid router with the balancing bias, gated shared expert, every 2nd layer", WITH_BIAS,
         ["ep2", "fsdp4-ep2"]),
        ("sigmoid router, gated shared expert, every 2nd layer, tensor-parallel", SIGMOID_SHARED, ["tp2ep2"]),
    ],
)
def test_expert_parallel_layouts_match_single(tiny_moe_config, variant, extra, layouts):
    report = compare_layouts(tiny_moe_config, layouts, steps=STEPS, overrides=[*RUN, *extra], timeout=300)
    print(f"\n{variant}\n" + report.table())
    assert_layouts_match(report, STEPS, TOLERANCE)


def test_an_expert_gradient_averaged_over_too_few_ranks_is_caught(tiny_moe_config, monkeypatch):
    """Planted: FSDP2 leaves the experts' gradients averaged over the ranks holding each expert only, not over the
    whole data axis; the per-tensor check names an expert."""
    from megatron_lite.engines.fsdp import FSDPEngine

    monkeypatch.setattr(FSDPEngine, "_reduce_expert_gradients", lambda self: None)
    report = compare_layouts(tiny_moe_config, ["fsdp4-ep2"], steps=1, overrides=RUN)
    assert report.failures() == ["fsdp4-ep2"]
    _, diff = report.worst_tensor("fsdp4-ep2")
    assert ".experts." in diff.name and diff.relative > 0.1, diff


def test_a_norm_that_counts_experts_as_replicated_is_caught(tiny_moe_config, monkeypatch):
    """Planted: the gradient norm forgets that each expert lives on one rank of its ep group."""
    from megatron_lite.engines import gradients

    monkeypatch.setattr(gradients, "is_expert_param", lambda name: False)
    report = compare_layouts(tiny_moe_config, ["ep2"], steps=1, overrides=RUN)
    assert report.failures() == ["ep2"]


def test_a_balancing_loss_taken_per_context_chunk_is_caught(tiny_moe_config, monkeypatch):
    """Planted: under context parallelism each rank takes the balancing loss over its own chunks of the sequence,
    not the whole sequence; the router's gradient is named."""
    from megatron_lite.models.moe import MoE
    from megatron_lite.parallel.context import ContextParallelMoE

    monkeypatch.setattr(ContextParallelMoE, "sequence_totals", MoE.sequence_totals)
    report = compare_layouts(tiny_moe_config, ["cp2"], steps=1, overrides=[*RUN, "model.moe.aux_loss_coef=1.0"])
    assert report.failures() == ["cp2"]
    _, diff = report.worst_tensor("cp2")
    assert ".router." in diff.name, diff


def test_an_ep2_checkpoint_resumes_in_one_process(tiny_moe_config, tmp_path):
    """Experts are saved under their global names, so a checkpoint written by ep2 resumes anywhere."""
    save_at, total = 2, 4
    reference = run_layout("single", tiny_moe_config, RUN, timeout=300).losses
    saved = tmp_path / "saved"
    run_layout("ep2", tiny_moe_config, [*RUN, f"checkpoint.interval={save_at}"], timeout=300, checkpoint_dir=saved)
    resumed = run_layout("single", tiny_moe_config, [*RUN, f"checkpoint.load={saved / f'step_{save_at:08d}'}"],
                         timeout=300, checkpoint_dir=tmp_path / "resumed").losses
    assert len(resumed) == total - save_at
    assert max(abs(a - b) for a, b in zip(resumed, reference[save_at:])) < TOLERANCE, (resumed, reference)


def test_a_zero1_ep2_checkpoint_resumes_in_one_process(tiny_moe_config, tmp_path):
    """Under DeepSpeed the experts stay outside ZeRO with their own AdamW, saved under the same logical names, so a
    checkpoint written by zero1-ep2 resumes in one process."""
    save_at, total = 2, 4
    reference = run_layout("single", tiny_moe_config, RUN, timeout=300).losses
    saved = tmp_path / "saved"
    run_layout("zero1-ep2", tiny_moe_config, [*RUN, f"checkpoint.interval={save_at}"], timeout=300,
               checkpoint_dir=saved)
    resumed = run_layout("single", tiny_moe_config, [*RUN, f"checkpoint.load={saved / f'step_{save_at:08d}'}"],
                         timeout=300, checkpoint_dir=tmp_path / "resumed").losses
    assert len(resumed) == total - save_at
    assert max(abs(a - b) for a, b in zip(resumed, reference[save_at:])) < TOLERANCE, (resumed, reference)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.ep=2", "model.moe.num_experts=0"], 2, "parallel.ep=2 needs mixture-of-experts layers"),
        (["parallel.ep=4"], 2, "parallel.ep=4 must divide the data-parallel size 2"),
        (["parallel.ep=2", "model.moe.num_experts=3", "model.moe.top_k=1"], 2,
         "model.moe.num_experts=3 is not divisible by parallel.ep=2"),
        (["parallel.ep=2", "parallel.engine=deepspeed", "parallel.zero_stage=3"], 2,
         "parallel.ep=2 with parallel.engine=deepspeed and parallel.zero_stage=3 is not supported"),
        (["parallel.tp=2", "parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel with model.moe"),
        (["training.precision=fp16"], 1, "training.precision=fp16 with model.moe is not supported"),
    ],
)
def test_bad_expert_parallel_settings_are_refused_in_one_line(tiny_moe_config, overrides, world, message):
    assert_refused_in_one_line(tiny_moe_config, overrides, world, message)
