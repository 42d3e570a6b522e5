"""bf16 layouts on one GPU against one process, through the parity harness; and FSDP2 with CPU offload.

Bounds (stated, not yet measured on a GPU): the CPU's bf16 bounds per engine (tests/engines/test_parity.py,
BF16_BOUNDS) with 1.5x room for the GPU's other kernels: training and frozen-pass losses within LOSS, every
tensor's gradient within GRAD of its norm.
"""

from __future__ import annotations

import importlib.util

from megatron_lite.parity import compare_layouts
from tests.gpu.conftest import GPU

STEPS = 2
LOSS, GRAD = 3e-3, 7.5e-2


def test_bf16_layouts_on_one_gpu_match_single_within_the_bounds(tiny_config):
    layouts = ["fsdp1", "fsdp1-offload"]  # FSDP2, and FSDP2 with CPUOffloadPolicy (shards made on the CPU)
    if importlib.util.find_spec("deepspeed") is not None:
        layouts += ["zero1-dp1", "zero2-dp1", "zero3-dp1"]
    report = compare_layouts(tiny_config, layouts, steps=STEPS, overrides=GPU, timeout=600)
    print("\n" + report.table(LOSS, GRAD))
    assert not report.errors, report.errors
    for name in layouts:
        assert report.problems(name, LOSS, GRAD) == [], report.table(LOSS, GRAD)
