"""Mixture-of-experts layers in one process: dropless top-k routing, the auxiliary losses' gradient, the balancing
bias, and names that stay layout-free."""

from __future__ import annotations

import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.models.decoder import build_model
from megatron_lite.models.moe import MoE, is_expert_param, moe_layers

TINY_MOE = "configs/tiny-moe.yaml"


def _layer(router: str = "softmax", **kw) -> MoE:
    torch.manual_seed(0)
    layer = MoE(16, 24, num_experts=6, top_k=2, router=router, **kw)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_every_token_reaches_exactly_its_top_k_experts(router):
    """Dropless: each token's output is the weighted sum of its own top-k experts, computed one token at a time."""
    layer = _layer(router, shared_experts=1, shared_expert_gate=True)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.linspace(-0.2, 0.2, 6))
    x = torch.randn(3, 10, 16)
    out = layer(x)
    flat = x.reshape(-1, 16)
    probs, chosen, weights = layer.route(layer.router(flat).float())
    assert chosen.shape == (30, 2) and all(len(set(row.tolist())) == 2 for row in chosen)
    for t in range(30):
        want = sum(w * layer.experts[str(int(e))](flat[t]) for e, w in zip(chosen[t], weights[t]))
        want = want + torch.sigmoid(layer.shared_gate(flat[t])) * layer.shared(flat[t])
        torch.testing.assert_close(out.reshape(-1, 16)[t], want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    stats = layer.take_statistics()
    assert stats[:6].sum() == 30 * 2 and stats[-1] == 30  # every (token, choice) counted once; nothing dropped


def test_the_auxiliary_losses_get_the_steps_gradient_scale():
    """The balancing and z-losses reach the router's gradient as if added to the loss times ``loss_scale``."""
    x = torch.randn(2, 8, 16)
    attached = _layer(aux_loss_coef=0.1, z_loss_coef=0.01)
    attached.loss_scale = 0.25
    attached(x).sum().backward()
    explicit = _layer(aux_loss_coef=0.1, z_loss_coef=0.01)
    logits = explicit.router(x.reshape(-1, 16)).float()
    probs, chosen, _ = explicit.route(logits)
    balance, z = explicit._losses(logits, probs, chosen, 8)
    total = _plain_output(explicit, x).sum() + 0.25 * (0.1 * balance + 0.01 * z)
    total.backward()
    torch.testing.assert_close(attached.router.weight.grad, explicit.router.weight.grad, rtol=1e-5, atol=1e-7)


def _plain_output(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with the auxiliary losses left out (coefficients zeroed for one call)."""
    coefs = layer.aux_loss_coef, layer.z_loss_coef
    layer.aux_loss_coef = layer.z_loss_coef = 0.0
    try:
        return layer(x)
    finally:
        layer.aux_loss_coef, layer.z_loss_coef = coefs


def test_the_balancing_bias_moves_load_toward_uniform_outside_the_gradient():
    """DeepSeek-V3's scheme: with a router that prefers two experts, the bias update evens the load step by step,
    while the bias is no parameter and the gradient does not reach it."""
    layer = _layer("sigmoid")
    with torch.no_grad():
        layer.router.weight[:2] += 0.1  # with inputs around 1, experts 0 and 1 win for nearly every token
    x = torch.randn(4, 32, 16) * 0.5 + 1.0
    loads = []
    for _ in range(60):
        layer.zero_grad()
        layer(x).sum().backward()
        load = layer.take_statistics()[:6]
        loads.append(float(load.max() / load.mean()))
        layer.update_bias(load, 0.02)
    assert "expert_bias" not in dict(layer.named_parameters()) and layer.expert_bias.grad is None
    assert loads[-1] < 0.6 * loads[0], loads[::10]
    assert min(loads[-10:]) < 1.5


def test_expert_names_are_global_and_layout_free():
    cfg = load_config(TINY_MOE, ["model.moe.every=2", "model.moe.shared_experts=1"])
    model = build_model(cfg.model, device="meta")
    assert sorted(moe_layers(model)) == [1, 3]
    names = [n for n, _ in model.named_parameters()]
    assert "layers.3.mlp.experts.3.down_proj.weight" in names and "layers.0.mlp.up_proj.weight" in names
    assert is_expert_param("layers.3.mlp.experts.3.down_proj.weight")
    assert not is_expert_param("layers.3.mlp.shared.down_proj.weight") and not is_expert_param("layers.3.mlp.router.weight")
    assert "layers.1.mlp.expert_bias" in model.state_dict()


@pytest.mark.parametrize("override, message", [
    (["model.moe.top_k=5"], "model.moe.top_k=5 exceeds model.moe.num_experts=4"),
    (["model.activation=gelu"], "model.moe needs model.activation=swiglu"),
    (["model.moe.bias_update_rate=0.001"], "model.moe.bias_update_rate=0.001 needs model.moe.router=sigmoid"),
    (["model.moe.shared_expert_gate=true"], "model.moe.shared_expert_gate=true needs model.moe.shared_experts >= 1"),
])
def test_bad_mixture_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(TINY_MOE, override)


def test_grouped_matmuls_compute_what_the_loop_does():
    """The CUDA path (one grouped matmul per projection over all experts) gives the loop's outputs and gradients;
    forced here on the CPU, where torch has the same kernel."""
    x = torch.randn(2, 12, 16)
    outs, grads = [], []
    for grouped in (False, True):
        layer = _layer()
        layer.grouped_experts = grouped
        y = layer(x)
        y.square().sum().backward()
        outs.append(y)
        grads.append(torch.cat([p.grad.reshape(-1) for p in layer.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
