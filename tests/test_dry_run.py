"""The dry run: a layout at its real world size, built rank by rank in one process under a fake process group.

Shrunk shapes at worlds of 64-512: every rank's parameter counts add up to the model's plus its replicated copies, the
most loaded rank is the one a hand count names, the planner agrees with the counts, an over-large micro-batch does not
fit (exit 3), a refused layout exits 2 with the line a launch prints, and a step traces under FSDP, TP+SP, PP and HSDP.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.dryrun import dry_run
from megatron_lite.rules import check_layout

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.vocab_size=1000", "model.pad_vocab_multiple=128", "model.hidden_size=256", "model.num_layers=8",
         "model.num_heads=8", "model.num_kv_heads=4", "model.ffn_hidden_size=704", "model.max_seq_len=512",
         "model.tie_embeddings=true", "data.seq_len=512", "training.micro_batch_size=1", "training.precision=bf16",
         "training.eval_samples=512"]


@pytest.fixture(scope="module")
def pretrain():
    spec = importlib.util.spec_from_file_location("pretrain", ROOT / "launch" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small(*overrides: str, gbs: int = 64):
    return load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"training.global_batch_size={gbs}", *overrides])


def test_every_rank_adds_up_to_the_model_plus_its_replicated_copies():
    """HSDP 2x8 over tp2 x pp2 (64 ranks), all simulated: each replica group's FSDP shards add up to the TP-local
    tensors, a TP-split tensor is held once per TP group, a replicated one (norms) on every TP rank, and the tied
    embedding twice (the first stage's embedding and the last stage's head)."""
    cfg = _small("parallel.engine=fsdp", "parallel.tp=2", "parallel.pp=2", "parallel.dp_replicate=2")
    report = dry_run(cfg, 64, "all", trace=False)
    assert len(report.ranks) == 64
    h, f, v, layers = 256, 704, 1024, 8
    q, kv = h * h, h * 128  # 4 kv heads of 32 over 8 heads of 32
    split = v * h + layers * (2 * q + 2 * kv + 3 * h * f)  # the embedding (tied head) and every projection
    replicated = layers * 2 * h + h  # each block's two norms and the final norm
    expected = 2 * (split + 2 * replicated + v * h)  # x2 replica groups; norms on both TP ranks; a second embedding
    assert sum(r.params for r in report.ranks) == expected


def test_the_most_loaded_rank_is_the_one_counted_by_hand():
    """pp2 with tied embeddings under FSDP over 16 ranks: both stages hold four blocks and a copy of the embedding,
    and the last also the final norm (256 elements, 16 per FSDP shard), so the most loaded rank is the last stage's
    first data-parallel rank (ties go to the lowest rank)."""
    cfg = _small("parallel.engine=fsdp", "parallel.pp=2")
    report = dry_run(cfg, 32, trace=False)
    dp = 16
    by_stage = {r.coords["pp"]: r for r in report.ranks if r.coords["dp"] == 0}
    assert by_stage[1].params - by_stage[0].params == 256 // dp
    assert report.worst_rank == 1 * dp  # (pp 1, dp 0, tp 0) in pp-major order


@pytest.mark.parametrize("overrides, world", [
    (["parallel.engine=fsdp"], 64),
    (["parallel.engine=fsdp", "parallel.dp_replicate=4"], 64),
    (["parallel.engine=fsdp", "parallel.tp=4", "parallel.sequence_parallel=true"], 64),
    (["parallel.engine=fsdp", "parallel.pp=4", "parallel.pp_schedule=interleaved"], 128),
    (["parallel.engine=ddp", "parallel.tp=2", "parallel.pp=2"], 64),
    (["parallel.engine=deepspeed", "parallel.zero_stage=1", "parallel.tp=2"], 256),
    (["parallel.engine=deepspeed", "parallel.zero_stage=2"], 64),
    (["parallel.engine=deepspeed", "parallel.zero_stage=3"], 512),
])
def test_the_planner_agrees_with_the_counts(overrides, world):
    """Weights, gradients and optimizer bytes of every simulated rank that is the first of its shard group, against
    the planner's estimate for the same layout (rank 0 of each stage is the one it plans for), within 1%."""
    cfg = _small(*overrides, gbs=max(64, world))
    report = dry_run(cfg, world, trace=False)
    assert "stages" in report.planner, report.planner
    compared = 0
    for rank in report.ranks:
        if rank.coords["dp"] % (report.layout["dp"] // cfg.parallel.dp_replicate):
            continue
        stage = report.planner_stage(rank)["breakdown"]
        for ours, key in ((rank.param_bytes, "weights"), (rank.grad_bytes, "gradients"),
                          (rank.optimizer_bytes, "optimizer")):
            assert math.isclose(ours, stage[key], rel_tol=0.01), (rank.rank, key, ours, stage[key])
            compared += 1
    assert compared >= 3


@pytest.mark.parametrize("overrides, world", [
    (["parallel.engine=fsdp"], 64),
    (["parallel.engine=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true"], 64),
    (["parallel.engine=ddp", "parallel.pp=2"], 64),
    (["parallel.engine=fsdp", "parallel.dp_replicate=2"], 64),
    # the worst rank's first stage (of two on the rank) sends hidden states: split by SP, bf16 under the policy
    (["parallel.engine=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2",
      "parallel.pp_schedule=interleaved"], 64),
    (["parallel.engine=deepspeed", "parallel.zero_stage=1", "parallel.pp=2", "parallel.pp_schedule=interleaved"], 64),
    # mixtures of experts, their tokens taken as spread evenly (fake tensors hold no routing), sent by all-to-all
    (["parallel.engine=fsdp", "model.moe.num_experts=8", "parallel.ep=8", "parallel.tp=2"], 64),
])
def test_a_step_traces_at_world_64(overrides, world):
    """A pipeline stage's traced output also matches what the stage declares to the next (``stage_io``)."""
    report = dry_run(_small(*overrides), world, trace=True)
    traced = report.worst().traced
    assert report.trace_error is None and traced, report.trace_error
    assert traced["total"] > 0 and traced.get("activations", 0) > 0


def test_activations_are_read_at_the_backward_s_peak_where_optimizer_states_outweigh_them():
    """Full recomputation on a thin shard keeps less for backward than AdamW's moments weigh: read at the one peak
    of the whole step, which fell in the optimizer's first step, the traced activations and temporaries were 8% of
    the planner's. The backward and the optimizer step are traced apart, the step with the states later steps find."""
    report = dry_run(_small("parallel.engine=fsdp", "model.activation_checkpointing=true"), 2, trace=True)
    worst, traced = report.worst(), report.worst().traced
    planned = report.planner_stage(worst)["phases"]["activations"]
    assert worst.optimizer_bytes > planned  # the case this is about
    assert 0.5 < (traced["activations"] + traced["temporaries"]) / planned < 2, (traced, planned)
    assert 0 < traced["step_temporaries"] < worst.optimizer_bytes
    assert traced["optimizer"] == worst.optimizer_bytes  # the moments exist before the backward, as in later steps


T5_SMALL = ["model.hidden_size=256", "model.num_heads=4", "model.ffn_hidden_size=512", "training.micro_batch_size=1",
            "training.precision=bf16", "training.global_batch_size=64", "training.eval_samples=64"]


def test_an_encoder_decoder_pipeline_stage_traces():
    """Its decoder stages take (decoder hidden states, encoder output) as the pipeline declares them."""
    cfg = load_config(ROOT / "configs" / "quickstart-t5.yaml", [*T5_SMALL, "parallel.engine=fsdp", "parallel.pp=2",
                                                                "parallel.tp=2"])
    report = dry_run(cfg, 64, trace=True)
    assert report.trace_error is None and report.worst().traced["total"] > 0, report.trace_error


def test_a_stage_that_returns_other_than_it_declares_is_reported(monkeypatch):
    """Planted: fp32 hidden states declared for FSDP2's bf16 policy."""
    import megatron_lite.parallel.pipeline as pipeline

    monkeypatch.setattr(pipeline, "boundary_dtypes", lambda cfg: (torch.float32, torch.bfloat16))
    report = dry_run(_small("parallel.engine=fsdp", "parallel.pp=2", "parallel.pp_schedule=interleaved"), 64)
    assert report.trace_error.startswith("RuntimeError: the pipeline stage returned [((1, 512, 256), torch.bfloat16)]"
                                         " but declares [((1, 512, 256), torch.float32)]"), report.trace_error


def test_an_over_large_micro_batch_does_not_fit_and_exits_3(pretrain, capsys):
    base = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--dry-run", "--world", "64", *SMALL,
            "parallel.engine=fsdp"]
    assert pretrain.main([*base, "training.global_batch_size=64"]) == 0
    assert "fits: rank 0" in capsys.readouterr().out
    big = ["training.micro_batch_size=2048", "training.global_batch_size=131072", "training.eval_samples=131072"]
    assert pretrain.main([*base, *big]) == 3
    assert capsys.readouterr().out.splitlines()[-1].startswith("does not fit: rank 0 needs")


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=3"],
    ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.tp=2"],
    ["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.pp=2"],
    ["parallel.pp=16", "parallel.pp_schedule=1f1b"],
    ["training.global_batch_size=100"],
])
def test_a_refused_layout_exits_2_with_the_line_a_launch_prints(pretrain, capsys, overrides):
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *SMALL, *overrides]
    cfg = load_config(args[1], args[2:])
    with pytest.raises(ConfigError) as refused:  # what the trainer of a real launch on 64 GPUs raises and prints
        check_layout(cfg, 64, "cuda")
    assert pretrain.main([*args[:2], "--dry-run", "--world", "64", *args[2:]]) == 2
    assert capsys.readouterr().err.strip() == f"error: {refused.value}"


@pytest.mark.slow
@pytest.mark.parametrize("config, world, overrides", [
    ("llama-8b.yaml", 64, []),  # torchrun --nnodes 8 --nproc_per_node 8 (the config's own comment)
    ("gpt2-124m.yaml", 8, []),  # deepspeed --num_gpus 8
    ("quickstart.yaml", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=1"]),  # the quickstart's launch
    ("tiny.yaml", 1, []),
])
def test_each_shipped_config_fits_at_the_world_its_comments_intend(pretrain, capsys, config, world, overrides):
    torch.set_num_threads(1)
    assert pretrain.main(["--config", str(ROOT / "configs" / config), "--dry-run", "--world", str(world),
                          *overrides]) == 0, capsys.readouterr().out
