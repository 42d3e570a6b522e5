"""Every layout trains like one process: per-step losses within 1e-5 in fp32 on the same global batches."""

from __future__ import annotations

import pytest

from megatron_lite.config import ConfigError
from megatron_lite.parity import DEFAULT_LAYOUTS, compare_layouts, parse_layout

TOLERANCE = 1e-5


def test_all_layouts_match_single(tiny_config):
    report = compare_layouts(tiny_config, list(DEFAULT_LAYOUTS), steps=3, timeout=300)
    print("\n" + report.table())
    assert not report.errors, report.errors
    assert set(report.losses) == set(DEFAULT_LAYOUTS)
    assert all(len(v) == 3 for v in report.losses.values())
    assert report.failures(TOLERANCE) == [], report.table()


@pytest.mark.parametrize(
    "name, world, expected",
    [
        ("single", 1, ["parallel.engine=single"]),
        ("ddp2", 2, ["parallel.engine=ddp"]),
        ("zero3-offload", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.offload_params=true"]),
        ("zero2-offload", 2, ["parallel.offload_optimizer=true"]),
        ("hsdp2x2", 4, ["parallel.engine=fsdp", "parallel.dp_replicate=2"]),
        ("zero1-tp2", 4, ["parallel.zero_stage=1", "parallel.tp=2"]),
        ("tp2pp2", 4, ["parallel.engine=ddp", "parallel.tp=2", "parallel.pp=2"]),
        ("fsdp2-pp2", 4, ["parallel.engine=fsdp", "parallel.pp=2"]),
        ("zero1-dp4", 4, ["parallel.zero_stage=1"]),
    ],
)
def test_layout_names(name, world, expected):
    layout = parse_layout(name)
    assert layout.world_size == world
    assert set(expected) <= set(layout.overrides)
    assert "parallel.offload_params=true" not in parse_layout("zero2-offload").overrides


@pytest.mark.parametrize("name", ["ddp", "zero4", "single-tp2", "ddp2-offload", "fsdp2-bogus"])
def test_bad_layout_names(name):
    with pytest.raises(ConfigError, match=f"layout '{name}'"):
        parse_layout(name)


def test_failing_layout_is_reported_not_raised(tiny_config):
    # fsdp_cpu_offload is refused on the CPU: the report names the layout and the reason, and the rest still runs.
    report = compare_layouts(tiny_config, ["fsdp2-offload"], steps=1, timeout=120)
    assert "single" in report.losses
    assert "fsdp2-offload" in report.errors and "fsdp_cpu_offload" in report.errors["fsdp2-offload"]
    assert report.failures(TOLERANCE) == ["fsdp2-offload"]


# bf16 bounds per layout: (loss, gradient), about 3x the largest difference from single measured over 2 steps
# (2026-12-06, 2-core CPU, torch 2.13, DeepSpeed 0.19.8): loss over the training and frozen steps, gradient as the
# worst relative difference of any tensor's piece (and of the norm).
BF16_BOUNDS = {
    "ddp2": (1e-5, 1e-5),  # the same autocast arithmetic as one process: measured 0 and 4.9e-8
    "pp2-1f1b": (1e-5, 1e-5),  # the same: < 1e-6 and 2.8e-8
    "zero2": (2e-3, 5e-2),  # DeepSpeed keeps bf16 weights and gradients: 6.0e-4 and 1.4e-2
    "zero3": (2e-3, 5e-2),  # 6.2e-4 and 1.4e-2
    "fsdp2": (3e-4, 3e-2),  # FSDP casts each unit's parameters: 9.5e-5 (frozen) and 1.0e-2
    "tp2": (2e-4, 3e-2),  # split matmuls round their partial sums in bf16: 5.6e-5 and 8.3e-3
}


def test_bf16_layouts_stay_within_their_measured_bounds(tiny_config):
    report = compare_layouts(tiny_config, list(BF16_BOUNDS), steps=2, overrides=["training.precision=bf16"])
    assert not report.errors, report.errors
    for name, (loss, grad) in BF16_BOUNDS.items():
        assert report.problems(name, loss, grad) == [], report.table(loss, grad)


def test_zero0_and_fsdp_without_resharding_match_single(tiny_config):
    """ZeRO stage 0 (DeepSpeed's plain data parallelism) and FSDP keeping gathered weights after forward.

    ``reshard_after_forward`` only concerns FSDP; the other layouts of this comparison ignore it.
    """
    overrides = ["parallel.reshard_after_forward=false"]
    report = compare_layouts(tiny_config, ["zero0", "fsdp2"], steps=2, overrides=overrides)
    assert not report.errors, report.errors
    assert report.failures(TOLERANCE) == [], report.table()


def test_fsdp_wraps_each_block_as_its_own_unit(tiny_config):
    """Each block of model.layers is an FSDP unit (one block's full weights at a time), and the root is one too."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from megatron_lite.config import load_config
    from megatron_lite.engines.fsdp import FSDPEngine
    from megatron_lite.families import get_family
    from megatron_lite.topology import Topology

    cfg = load_config(tiny_config, ["parallel.engine=fsdp"])
    family = get_family(cfg.model.family)
    try:
        topology = Topology(device=torch.device("cpu"))
        engine = FSDPEngine(cfg, family.factory(cfg, topology), topology, family.task(cfg, topology))
        blocks = list(engine.model.layers.values())
        assert len(blocks) == cfg.model.num_layers
        assert all(isinstance(block, FSDPModule) for block in blocks)
        assert isinstance(engine.model, FSDPModule)
        assert not isinstance(engine.model.embed, FSDPModule)  # the embedding belongs to the root unit
    finally:  # the one-rank process group must not leak into ranks forked by later tests
        if dist.is_initialized():
            dist.destroy_process_group()


def test_activation_checkpointing_wrapped_outside_the_model_matches_single(tiny_config):
    """Checkpointing is applied to each block from outside, before FSDP or DeepSpeed wrap the model: the recomputation
    in backward must see the same (gathered) weights and give the same losses as one process without it."""
    from megatron_lite.parity import run_layout

    report = compare_layouts(tiny_config, ["fsdp2", "zero3"], steps=2, overrides=["model.activation_checkpointing=true"])
    assert not report.errors, report.errors
    assert report.failures(TOLERANCE) == [], report.table()
    plain = run_layout("single", tiny_config, ["training.train_steps=2", "training.eval_interval=0"]).losses
    assert plain == report.losses["single"]  # recomputation changes no arithmetic
