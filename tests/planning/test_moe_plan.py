"""The planner on mixture-of-experts decoders: counts (total and active), FLOPs from active parameters, per-rank
memory and step time with expert parallelism, and ep in the layout search."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_lite.config import ModelConfig, MoEConfig
from megatron_lite.models.decoder import DecoderLM
from megatron_lite.models.presets import PRESETS
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.flops import training_flops_per_token
from megatron_lite.planning.layout import Layout, stage_shapes
from megatron_lite.planning.memory import estimate, layer_activation_bytes, rank_state_bytes
from megatron_lite.planning.params import count_params, decoder_shapes, matmul_params
from megatron_lite.planning.presets import get_preset
from megatron_lite.planning.search import Constraints, candidate_layouts, search
from megatron_lite.planning.steptime import Network, step_time

PEAK = 989e12

# A small Mixtral-like decoder. Per layer: two norms (64 each), q/k/v/o (4 x 64 x 64 = 16,384), a router [4, 64] (256)
# and 4 experts of 3 x 64 x 32 = 6,144 each (24,576): 41,344. Embedding and untied head 128 x 64 each, final norm 64.
SMALL = ModelConfig(
    vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128, max_seq_len=64,
    position="rotary", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=32),
)  # fmt: skip
DENSE_PARAMS = 2 * 128 * 64 + 64 + 2 * (64 + 16_384 + 64 + 256)  # 49,984: everything but the routed experts
EXPERT = 3 * 64 * 32  # 6,144
SMALL_TOTAL = DENSE_PARAMS + 2 * 4 * EXPERT  # 99,136


# ----------------------------------------------------------------------------------------------------------------------
# Counts


def test_mixtral_counts_are_the_published_ones() -> None:
    """46.7B parameters, 12.9B active per token (Jiang et al. 2024): 32 x 6 unchosen experts of 3 x 4096 x 14336."""
    counts = count_params(get_preset("mixtral-8x7b"))
    assert counts.total == 46_702_792_704
    assert counts.active == 12_879_925_248
    assert counts.routed_experts == 32 * 8 * 3 * 4096 * 14336
    assert counts.per_layer == {"decoder_moe": 1_451_270_144}
    assert count_params(PRESETS["llama2-7b"]).active == count_params(PRESETS["llama2-7b"]).total  # dense


@pytest.mark.parametrize("moe", [
    SMALL.moe,
    MoEConfig(num_experts=3, top_k=1, every=2, shared_experts=2, shared_expert_gate=True),  # dense and mixture blocks
])  # fmt: skip
def test_counts_equal_the_meta_model(moe: MoEConfig) -> None:
    cfg = dataclasses.replace(SMALL, num_layers=3, num_kv_heads=2, qkv_bias=True, moe=moe)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == decoder_shapes(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    if moe.every == 2:
        assert set(count_params(cfg).per_layer) == {"decoder", "decoder_moe"}


def test_small_counts_by_hand() -> None:
    counts = count_params(SMALL)
    assert counts.total == SMALL_TOTAL
    assert counts.active == SMALL_TOTAL - 2 * (4 - 2) * EXPERT  # two of the four experts per layer
    assert matmul_params(SMALL) == counts.active - 128 * 64  # the token table is a lookup


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs


def test_flops_use_active_parameters() -> None:
    mixtral = get_preset("mixtral-8x7b")
    attention = 12 * 32 * 32 * 128 * 4096
    n_active = 12_879_925_248 - 32000 * 4096
    assert training_flops_per_token(mixtral, 4096) == 6 * n_active + attention
    assert training_flops_per_token(mixtral, 4096) < 0.3 * (6 * 46_702_792_704 + attention)


def test_flops_match_the_counted_matmuls() -> None:
    """Forward and backward of the real model: every routed copy of a token meets one expert, so the matmul FLOPs
    torch counts are the 6 N_active + attention of the convention, less the 6 FLOPs it gives each norm scale."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = DecoderLM(SMALL)
    batch, s = 2, 16
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 128, (batch, s))).float().sum().backward()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    expected = (training_flops_per_token(SMALL, s) - 6 * norms) * s * batch
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# Memory


def test_expert_states_divide_by_ep() -> None:
    """Without sharding (ZeRO 0 arithmetic, bf16): a rank holds the dense parameters and 4/ep experts per layer;
    2 + 2 + 12 bytes each, 4 bytes of step per tensor (17 dense, 2 x 3 x 4/ep expert tensors), the fp32 gradient
    copy of all of them at the step."""
    for ep, held in ((1, 4), (2, 2), (4, 1)):
        lay = Layout(gpus=8, ep=ep, zero=0, seq_len=32)
        psi = DENSE_PARAMS + 2 * held * EXPERT
        states = rank_state_bytes(stage_shapes(SMALL, 1, 1, 0, lay), lay)
        assert psi == {1: 99_136, 2: 74_560, 4: 62_272}[ep]
        assert states == {"weights": 2 * psi, "gradients": 2 * psi, "optimizer": 12 * psi + 4 * (17 + 6 * held),
                          "step_gradients": 4 * psi, "cpu": 0}


def test_deepspeed_keeps_the_experts_out_of_zero() -> None:
    """DeepSpeed ZeRO 1 with ep 2 (engines/deepspeed.py): the dense part as ZeRO 1 partitions it over the 8 data
    ranks, the rank's 2 x 2 experts whole beside it with a torch AdamW: bf16 weights and gradients, fp32 masters and
    moments, a step per tensor, and their fp32 gradients at the step."""
    from megatron_lite.planning.memory import model_state_bytes
    from megatron_lite.planning.params import is_expert

    lay = Layout(gpus=8, ep=2, zero=1, seq_len=32)
    shapes = stage_shapes(SMALL, 1, 1, 0, lay)
    dense = model_state_bytes([(n, s) for n, s in shapes if not is_expert(n)], lay)
    held = 2 * 2 * EXPERT
    experts = {"weights": 2 * held, "gradients": 2 * held, "optimizer": 12 * held + 4 * 12,
               "step_gradients": 4 * held, "cpu": 0}
    assert rank_state_bytes(shapes, lay) == {k: dense[k] + experts[k] for k in dense}


def test_fsdp_memory_per_rank_falls_with_ep() -> None:
    """FSDP2 on 8 ranks, bf16, s 32, one microbatch. Experts shard over the 8 / ep ranks that hold them: a rank keeps
    the same 12,456 elements whatever ep (6,312 dense, 6,144 of experts), so weights, gradients and moments are
    equal but for the step counters (one per tensor). What is gathered falls: two whole blocks (16,768 dense and 4 x
    6,144 expert elements each) with ep 1; with ep > 1 each expert is an FSDP unit of its own, so two blocks' dense
    parts or one with two experts, whichever is larger (here the first). The whole falls with it."""
    local = 2 * 16 * 64 + 8 + 2 * (8 + 8 + 4 * 8 * 64 + 1 * 64) + 6_144  # embed and head 16 rows each, norms 8
    assert local == 12_456
    act = estimate(SMALL, Layout(gpus=8, engine="fsdp", seq_len=32, global_batch=8, overhead_bytes=0))["breakdown"]
    totals = {}
    for ep, held in ((1, 4), (2, 2), (4, 1)):
        lay = Layout(gpus=8, engine="fsdp", ep=ep, seq_len=32, global_batch=8, overhead_bytes=0)
        r = estimate(SMALL, lay)
        tensors = 17 + 2 * 3 * held
        gathered = 2 * (2 * (16_768 + 4 * EXPERT) if ep == 1 else max(2 * 16_768, 16_768 + 2 * EXPERT))
        b = r["breakdown"]
        assert (b["weights"], b["gradients"], b["optimizer"]) == (4 * local, 4 * local, 8 * local + 4 * tensors)
        assert r["phases"]["gathered"] == b["overhead"] == gathered
        assert b["activations"] == act["activations"]  # each rank routes as many token copies whatever ep
        totals[ep] = r["per_gpu_bytes"]
        assert totals[ep] == 16 * local + 4 * tensors + gathered + b["activations"]
    assert totals[1] - totals[2] == 4 * 12 + 2 * 2 * 4 * EXPERT  # 12 fewer tensors, 4 x 6,144 fewer gathered
    assert totals[2] - totals[4] == 4 * 6
    assert totals[1] > totals[2] > totals[4]


def test_mixture_layer_activations() -> None:
    """Per token (s 32, b 1, bf16, flash): attention as for a dense layer; the mixture keeps its norm and router
    inputs, fp32 router logits and probabilities, and per routed copy (top 2) the expert's input and output rows and
    its 4 intermediates."""
    lay = Layout(seq_len=32)
    h, f, k, e, p = 64, 32, 2, 4, 2
    attention = 2 * h * p + (2 * h + 2 * h) * p + 4 * 4
    mixture = 2 * h * p + 2 * 4 * e + k * (2 * h + 4 * f) * p
    assert layer_activation_bytes(SMALL, lay, True, True) == 32 * (attention + mixture) == 67_072
    dense = layer_activation_bytes(SMALL, lay)  # the same block with its dense MLP (width 128)
    assert dense == 32 * (attention + 2 * h * p + 4 * 128 * p)


def test_ep_is_checked() -> None:
    for lay, what in ((Layout(gpus=8, engine="fsdp", ep=3), "ep"), (Layout(gpus=4, engine="fsdp", ep=8), "ep")):
        with pytest.raises(PlanError, match=what):
            lay.validate(SMALL)
    with pytest.raises(PlanError, match="mixture-of-experts"):
        Layout(gpus=8, engine="fsdp", ep=2).validate(PRESETS["tiny"])


# ----------------------------------------------------------------------------------------------------------------------
# Step time


def test_all_to_all_only_with_expert_parallelism() -> None:
    """Two all-to-alls forward and two backward per mixture layer and microbatch (six with full recomputation), each
    of tokens x top_k x (ep - 1)/ep rows of h values per rank."""
    base = Layout(gpus=8, engine="fsdp", seq_len=32, micro_batch=2, global_batch=32)  # m = 2
    net = Network()
    assert step_time(SMALL, base, PEAK)["ep_comm_s"] == 0.0
    assert step_time(PRESETS["tiny"], base, PEAK)["ep_comm_s"] == 0.0
    a2a = 32 * 2 * 2 * (4 - 1) / 4 * 64 * 2  # bytes of one all-to-all
    r = step_time(SMALL, dataclasses.replace(base, ep=4), PEAK, net=net)
    assert r["ep_comm_s"] == pytest.approx(2 * 2 * 4 * a2a / net.intra_node)
    full = step_time(SMALL, dataclasses.replace(base, ep=4, recompute="full"), PEAK, net=net)
    assert full["ep_comm_s"] == pytest.approx(2 * 2 * 6 * a2a / net.intra_node)
    parts = ("compute_s", "fixed_s", "tp_comm_s", "pp_comm_s", "cp_comm_s", "ep_comm_s", "bubble_s", "dp_comm_s")
    assert r["step_time_s"] == pytest.approx(sum(r[k] for k in parts))


# ----------------------------------------------------------------------------------------------------------------------
# Search


def test_search_proposes_ep_for_a_mixture_model_only() -> None:
    fixed = Constraints(tp=1, pp=1, micro_batch=1, recompute="none")
    base = Layout(gpus=8, seq_len=32, global_batch=8)
    eps = {lay.ep for lay in candidate_layouts(SMALL, base, fixed) if lay.engine == "fsdp"}
    assert eps == {1, 2, 4}  # the divisors of dp 8 that divide 4 experts
    assert {lay.ep for lay in candidate_layouts(PRESETS["tiny"], base, fixed)} == {1}
    rows = search(SMALL, base, 80 * 2**30, PEAK, top=100, fixed=fixed)
    assert {r["layout"]["ep"] for r in rows} >= {2, 4}
    assert {r["layout"]["ep"] for r in search(PRESETS["tiny"], base, 80 * 2**30, PEAK, top=100, fixed=fixed)} == {1}


def test_the_documented_mixtral_command(capsys: pytest.CaptureFixture) -> None:
    """docs/plan.md's command: Mixtral-8x7B on 64 GPUs with FSDP2, ep 1 against ep 8."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "plan.py"
    spec = importlib.util.spec_from_file_location("plan_cli_moe", path)
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    got = {}
    for ep in (1, 8):
        argv = ["memory", "--preset", "mixtral-8x7b", "--gpus", "64", "--fsdp", "--ep", str(ep), "--seq-len", "4096",
                "--recompute", "full"]
        assert plan.main(argv + ["--json"]) == 0
        got[ep] = json.loads(capsys.readouterr().out)
    assert got[8]["layout"]["ep"] == 8 and got[8]["layout"]["expert_data"] == 8
    assert got[8]["phases"]["gathered"] < got[1]["phases"]["gathered"] / 6  # a block's 8 experts against 1
    assert got[8]["per_gpu_bytes"] < got[1]["per_gpu_bytes"]
