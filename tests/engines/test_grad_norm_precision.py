"""The gradient norm of bf16 gradients (ZeRO-0 keeps them in the model's dtype, e.g. under pipeline parallelism) is
summed in fp32/fp64, not rounded to bf16 tensor by tensor."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.engines.gradients import global_grad_norm
from megatron_lite.topology import Topology


def test_bf16_gradient_norm_is_exact_to_fp32():
    params = []
    for shape, value in (((3,), 0.1), ((1000,), 0.013), ((7, 5), -0.37)):
        p = nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))
        p.grad = torch.full(shape, value, dtype=torch.bfloat16)
        params.append(p)
    exact = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    norm = global_grad_norm([(f"p{i}", p) for i, p in enumerate(params)], Topology())
    assert norm.dtype == torch.float64
    assert abs(float(norm) - float(exact)) / float(exact) < 1e-6  # bf16 rounding was ~2e-3 off


def test_fp32_and_bf16_gradients_together():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    a.grad, b.grad = torch.full((4,), 3.0), torch.full((4,), 4.0, dtype=torch.bfloat16)
    assert float(global_grad_norm([("a", a), ("b", b)], Topology())) == 10.0  # sqrt(4 * 9 + 4 * 16)


def test_a_large_fp32_gradient_norm_is_exact_to_fp64():
    """An embedding-sized fp32 gradient with a few large rows: its norm summed in fp32 would be ~4e-4 off on the
    CPU, which the parity harness's 1e-5 norm check sees between a sharded and a whole layout."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(8192 * 192))
    p.grad = torch.randn(8192 * 192) * 1e-3
    p.grad[:100] *= 1000
    exact = p.grad.double().square().sum().sqrt()
    norm = global_grad_norm([("embed.weight", p)], Topology())
    assert abs(float(norm) - float(exact)) / float(exact) < 1e-12
