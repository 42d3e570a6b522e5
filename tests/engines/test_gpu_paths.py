"""The GPU paths a CPU can check: where optimizer state lives after a load, tensor-parallel checkpoint views that
share memory with their buffers whatever the mesh's device, FSDP2's CPU offload building on the CPU, and fp16 loss
scaling that agrees across tensor-parallel ranks.

A device other than the CPU is stood in for by the meta device: tensors on it, or a device mesh typed ``meta``
under a fake process group, show the same device mismatches a CUDA run would.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from megatron_lite.engines.logical import ensure_adamw_state, ensure_adamw_state_for
from megatron_lite.parity import run_ranks


# ----------------------------------------------------------------------------------------------------------------------
# AdamW state after a load (fused AdamW on CUDA reads its step count on the parameter's device)
# ----------------------------------------------------------------------------------------------------------------------


def _torch_loaded(params: list[nn.Parameter], flags: dict) -> torch.optim.AdamW:
    """An AdamW whose state came through torch's own ``load_state_dict`` (the reference for where it lives)."""
    opt = torch.optim.AdamW(params, **flags)
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(p.shape), "exp_avg_sq": torch.zeros(p.shape)}
             for i, p in enumerate(params)}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return opt


def _placement(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, tuple]:
    return {key: (value.device.type, value.dtype, tuple(value.shape)) for key, value in opt.state[p].items()}


@pytest.mark.parametrize("flags", [{}, {"foreach": False}, {"fused": True}, {"capturable": True}],
                         ids=["default", "for-loop", "fused", "capturable"])
def test_adamw_state_sits_where_torch_load_state_dict_puts_it(flags):
    # parameters on the meta device stand for a GPU's: a device that is not the CPU
    params = [nn.Parameter(torch.empty(4, 3, device="meta")), nn.Parameter(torch.empty(3, device="meta"))]
    ours = torch.optim.AdamW(params, **flags)
    ensure_adamw_state(ours)
    theirs = _torch_loaded(params, flags)
    for p in params:
        assert _placement(ours, p) == _placement(theirs, p)


def test_adamw_state_of_tensors_outside_the_groups_follows_the_defaults():
    """ZeRO-3 puts its flat partitions into the optimizer's groups only while it steps."""
    params = [nn.Parameter(torch.empty(3, device="meta"))]
    outside = torch.empty(5, device="meta")
    fused, plain = torch.optim.AdamW(params, fused=True), torch.optim.AdamW(params)
    ensure_adamw_state_for(fused, [outside])
    ensure_adamw_state_for(plain, [outside])
    assert fused.state[outside]["step"].device.type == "meta"
    assert plain.state[outside]["step"].device.type == "cpu"


def test_fused_adamw_steps_on_the_state_created_ahead_of_time():
    """torch 2.13 runs fused AdamW on the CPU: the state made before the first step is the state it steps."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    b.data.copy_(a.data)
    ahead, lazy = torch.optim.AdamW([a], fused=True), torch.optim.AdamW([b], fused=True)
    ensure_adamw_state(ahead)
    for _ in range(2):
        grad = torch.randn(6, 4)
        a.grad, b.grad = grad.clone(), grad.clone()
        ahead.step()
        lazy.step()
    assert torch.equal(a, b) and float(ahead.state[a]["step"]) == 2.0
