"""bf16 training on one GPU under each engine: train, save, resume, and the loss sequence continues.

A resumed run must give the losses an uninterrupted run gives after the checkpoint's step (within RTOL: bf16 on a
GPU, where attention's backward may accumulate in another order from run to run). The first optimizer step after
the load is where fused AdamW on CUDA used to fail (its step count was made on the CPU).
"""

from __future__ import annotations

import pytest

from megatron_lite.parity import run_layout
from tests.gpu.conftest import GPU, needs_deepspeed

STEPS, SAVE_AT = 4, 2
RTOL = 2e-3


@pytest.mark.parametrize("layout", ["single", "fsdp1", "zero1-dp1", "zero3-dp1"])
def test_bf16_train_save_resume_continues_the_loss_sequence(layout, tiny_config, tmp_path):
    needs_deepspeed(layout)
    run = [*GPU, f"training.train_steps={STEPS}"]
    full = run_layout(layout, tiny_config, [*run, f"checkpoint.interval={SAVE_AT}"], timeout=300,
                      checkpoint_dir=tmp_path / "full").losses
    ckpt = tmp_path / "full" / f"step_{SAVE_AT:08d}"
    resumed = run_layout(layout, tiny_config, [*run, f"checkpoint.load={ckpt}"], timeout=300,
                         checkpoint_dir=tmp_path / "resumed").losses
    assert len(full) == STEPS and len(resumed) == STEPS - SAVE_AT, (full, resumed)
    for got, want in zip(resumed, full[SAVE_AT:]):
        assert abs(got - want) <= RTOL * abs(want), (layout, resumed, full)
