"""What runs on the GPU: the attention kernel masked attention actually uses, FlexAttention's gradients against SDPA's,
compiled blocks (with and without document masks), fused AdamW on bf16 parameters after a checkpoint load, and the
mixture layers' grouped expert matmuls against their loop.

Each check runs in a forked child (the pytest process never initializes CUDA) and writes what it saw to JSON.
"""

from __future__ import annotations

import json

from megatron_lite.parity import run_layout, run_ranks
from tests.gpu.conftest import GPU

SEQ, BATCH = 1024, 4
# profiler names of the kernels that never hold the s x s scores (SDPA's flash, cuDNN and memory-efficient kernels;
# compiled FlexAttention's Triton templates) and of the one that does (SDPA's math fallback)
FAST = ("flash", "cudnn", "efficient", "flex", "triton_tem")
MATH = "_scaled_dot_product_attention_math"


def _attention(rank: int, out: str) -> None:
    import torch

    from megatron_lite.models.layers import Attention, build_attention_mask

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    attn = Attention(512, 8, 2, 64, bias=False, dropout=0.0).to(dev)  # GQA: 8 query heads over 2 kv heads
    x = torch.randn(BATCH, SEQ, 512, device=dev)
    docs = (torch.arange(SEQ, device=dev) // 300).expand(BATCH, SEQ)  # packed documents, reset at each boundary
    pad = torch.arange(SEQ, device=dev)[None, :] < torch.tensor([SEQ, 900, 700, 513], device=dev)[:, None]
    cases = {"causal": (None, None), "documents": (docs, None), "padding": (None, pad), "documents+padding": (docs, pad)}
    result: dict = {"kernels": {}, "max_rel_diff": {}}
    for name, (d, p) in cases.items():
        mask = build_attention_mask(SEQ, d, p, device=dev)  # the CUDA default: a FlexAttention block mask
        real = p if p is not None else torch.ones(BATCH, SEQ, dtype=torch.bool, device=dev)

        def step(m):
            for param in attn.parameters():
                param.grad = None
            xx = x.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = attn(xx, mask=m, causal=True)
            (y.float().square() * real[..., None]).mean().backward()  # padded queries' outputs are junk: no loss
            return y.float(), xx.grad.float(), attn.q_proj.weight.grad.float().clone()

        step(mask)  # warm up: FlexAttention compiles here
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = step(mask)
            torch.cuda.synchronize()
        result["kernels"][name] = sorted({e.key for e in prof.key_averages()})
        if mask is not None:  # the same rule as a dense mask through SDPA: outputs and gradients agree
            want = step(build_attention_mask(SEQ, d, p, device=dev, kernel="sdpa"))
            diffs = [(got[0] - want[0])[real].norm() / want[0][real].norm(),
                     (got[1] - want[1])[real].norm() / want[1][real].norm(),
                     (got[2] - want[2]).norm() / want[2].norm()]
            result["max_rel_diff"][name] = max(float(v) for v in diffs)
    with open(out, "w") as f:
        json.dump(result, f)


def test_masked_attention_runs_a_fast_kernel_and_matches_sdpa(tmp_path):
    out = tmp_path / "attention.json"
    run_ranks(_attention, 1, (str(out),), timeout=300)
    result = json.loads(out.read_text())
    for case, names in result["kernels"].items():
        assert not any(MATH in n for n in names), (case, [n for n in names if "attention" in n.lower()])
        assert any(k in n.lower() for n in names for k in FAST), (case, names)
    for case, diff in result["max_rel_diff"].items():
        assert diff < 2e-2, (case, diff)  # bf16 outputs and gradients, relative to their norms


def test_compiled_blocks_train_like_eager_blocks(tiny_config):
    for extra in ([], ["data.reset_at_document=true"]):  # causal SDPA, then FlexAttention inside compiled blocks
        run = [*GPU, "training.train_steps=3", *extra]
        eager = run_layout("single", tiny_config, run, timeout=300).losses
        compiled = run_layout("single", tiny_config, [*run, "training.compile=true"], timeout=600).losses
        assert max(abs(a - b) for a, b in zip(eager, compiled)) < 2e-3 * max(eager), (extra, eager, compiled)


def _fused_adamw(rank: int, out: str) -> None:
    import torch

    from megatron_lite.engines.logical import ensure_adamw_state

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    fused = [torch.nn.Parameter(torch.randn(256, 128, device=dev, dtype=torch.bfloat16)) for _ in range(3)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    opt_fused = torch.optim.AdamW(fused, lr=1e-2, fused=True)
    opt_plain = torch.optim.AdamW(plain, lr=1e-2, foreach=False)
    ensure_adamw_state(opt_fused)  # as a checkpoint load does before the first step
    for _ in range(5):
        for a, b in zip(fused, plain):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt_fused.step()
        opt_plain.step()
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(fused, plain))
    steps = sorted({(str(opt_fused.state[p]["step"].device), float(opt_fused.state[p]["step"])) for p in fused})
    with open(out, "w") as f:
        json.dump({"diff": diff, "steps": steps, "dtype": str(fused[0].dtype)}, f)


def test_fused_adamw_steps_bf16_parameters_after_a_load(tmp_path):
    out = tmp_path / "adamw.json"
    run_ranks(_fused_adamw, 1, (str(out),), timeout=120)
    result = json.loads(out.read_text())
    assert result["steps"] == [["cuda:0", 5.0]] and result["dtype"] == "torch.bfloat16", result
    assert result["diff"] < 5e-2, result  # bf16 parameters: the fused and for-loop updates round differently


def _grouped_experts(rank: int, out: str) -> None:
    import torch

    from megatron_lite.models.moe import MoE

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    layer = MoE(512, 1024, num_experts=8, top_k=2).to(dev)
    x = torch.randn(4, 256, 512, device=dev)
    got = {}
    for grouped in (False, True):
        layer.grouped_experts = grouped
        layer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()
        got[grouped] = (y.float(), layer.experts["3"].down_proj.weight.grad.float().clone())
    layer.grouped_experts = None
    with open(out, "w") as f:
        json.dump({"default_grouped": layer._grouped(x), "out": float((got[True][0] - got[False][0]).norm()
                   / got[False][0].norm()), "grad": float((got[True][1] - got[False][1]).norm()
                                                       / got[False][1].norm())}, f)


def test_grouped_expert_matmuls_match_the_loop(tmp_path):
    """On compute capability 9.0 (H100/H200) the mixture layer picks grouped matmuls by default; in bf16 they give
    the per-expert loop's outputs and gradients to bf16 rounding."""
    out = tmp_path / "grouped.json"
    run_ranks(_grouped_experts, 1, (str(out),), timeout=120)
    result = json.loads(out.read_text())
    assert result["default_grouped"], result
    assert result["out"] < 2e-2 and result["grad"] < 2e-2, result
