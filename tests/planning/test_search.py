"""Layout search: every layout is timed on the same global batch; microbatches drive the bubble, the accumulation
traffic and the fixed per-microbatch cost; user choices constrain the enumeration."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.layout import Layout
from megatron_lite.planning.presets import REFERENCE_PRESETS
from megatron_lite.planning.search import Constraints, candidate_layouts, default_global_batch, search
from megatron_lite.planning.steptime import LAYER_OVERHEAD_S, Network, stage_params, step_time

LLAMA = REFERENCE_PRESETS["llama3-8b"]
GPT2 = REFERENCE_PRESETS["gpt2-124m"]
PEAK = 989e12
GiB = 2**30


def test_layouts_with_different_dp_are_timed_on_the_same_batch() -> None:
    """tp8/pp1/dp2 and tp8/pp2/dp1 both process 128 sequences per step; dp2 halves the work per rank and has no
    bubble, so it is faster, and the step time ranks exactly as the throughput does."""
    base = Layout(gpus=16, tp=8, seq_len=8192, global_batch=128)
    dp2 = step_time(LLAMA, dataclasses.replace(base, pp=1), PEAK)
    dp1 = step_time(LLAMA, dataclasses.replace(base, pp=2), PEAK)
    assert dp2["tokens_per_step"] == dp1["tokens_per_step"] == 128 * 8192
    assert (dp2["microbatches"], dp1["microbatches"]) == (64, 128)
    assert dp2["step_time_s"] < dp1["step_time_s"] and dp2["tokens_per_s"] > dp1["tokens_per_s"]
    rows = search(LLAMA, Layout(gpus=16, seq_len=8192), 80 * GiB, PEAK, top=1000)
    assert {r["tokens_per_step"] for r in rows} == {128 * 8192}  # the default batch: 2^20 tokens
    assert [r["step_time_s"] for r in rows] == sorted(r["step_time_s"] for r in rows)
    assert [r["tokens_per_s"] for r in rows] == sorted((r["tokens_per_s"] for r in rows), reverse=True)
    rank: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        rank.setdefault((r["layout"]["tp"], r["layout"]["pp"], r["layout"]["micro_batch"], r["layout"]["recompute"]), i)
    assert rank[(8, 1, 1, "none")] < rank[(8, 2, 1, "none")]  # ranked the other way round before


def test_default_global_batch() -> None:
    assert default_global_batch(LLAMA, Layout(gpus=16, seq_len=8192)) == 128  # 2^20 / 8192
    assert default_global_batch(LLAMA, Layout(gpus=24, seq_len=8192)) == 120  # rounded to a multiple of 24
    assert default_global_batch(LLAMA, Layout(gpus=512, seq_len=8192)) == 512  # at least one per GPU
    assert default_global_batch(LLAMA, Layout(gpus=16, seq_len=8192), micro_batch=16) == 256  # of 16 x 16
    t5 = REFERENCE_PRESETS["t5-small"]
    assert default_global_batch(t5, Layout(gpus=8, seq_len=512)) == 1024  # 512 input + 512 target tokens


def test_pipeline_bubble_is_pp_minus_one_microbatch_slots() -> None:
    lay = Layout(gpus=8, pp=4, seq_len=1024, global_batch=64, micro_batch=2)  # dp 2, m = 16
    r = step_time(GPT2, lay, PEAK)
    per_mb = (r["compute_s"] + r["fixed_s"] + r["tp_comm_s"] + r["pp_comm_s"]) / 16
    assert r["microbatches"] == 16
    assert r["bubble_s"] == pytest.approx(3 * per_mb)
    inter = step_time(GPT2, dataclasses.replace(lay, schedule="interleaved", virtual_stages=3), PEAK)
    inter_mb = (inter["compute_s"] + inter["fixed_s"] + inter["tp_comm_s"] + inter["pp_comm_s"]) / 16
    assert inter["bubble_s"] == pytest.approx(3 * inter_mb / 3)  # (pp - 1) / v slots, each rank's layers per slot
    parts = ("compute_s", "fixed_s", "tp_comm_s", "pp_comm_s", "bubble_s", "dp_comm_s")
    assert r["step_time_s"] == pytest.approx(sum(r[k] for k in parts))


def test_micro_batch_changes_the_estimate() -> None:
    """Same batch, same FLOPs: a larger micro-batch runs fewer microbatches, so it pays the fixed per-layer cost
    fewer times; with a pipeline it also has fewer microbatches to fill the bubble with."""
    lay = Layout(gpus=8, seq_len=1024, global_batch=256, zero=1)  # dp 8: 32 sequences per rank
    small = step_time(GPT2, dataclasses.replace(lay, micro_batch=1), PEAK)
    large = step_time(GPT2, dataclasses.replace(lay, micro_batch=8), PEAK)
    assert small["compute_s"] == large["compute_s"]
    assert small["fixed_s"] == pytest.approx(32 * 12 * LAYER_OVERHEAD_S)
    assert large["fixed_s"] == pytest.approx(4 * 12 * LAYER_OVERHEAD_S)
    assert large["step_time_s"] < small["step_time_s"]
    flat = [step_time(GPT2, dataclasses.replace(lay, micro_batch=b), PEAK, layer_overhead_s=0.0) for b in (1, 8)]
    assert flat[0]["step_time_s"] == pytest.approx(flat[1]["step_time_s"])  # nothing else depends on it here
    piped = dataclasses.replace(lay, gpus=8, pp=4, zero=0, global_batch=64)  # dp 2: 32 sequences per rank
    bubbles = [step_time(GPT2, dataclasses.replace(piped, micro_batch=b), PEAK)["bubble_s"] for b in (1, 8)]
    assert bubbles[1] > bubbles[0]


def test_data_parallel_traffic_per_engine() -> None:
    """Bytes per step through the ring, in units of (d - 1)/d * params * 2 bytes (bf16), for m = 4 microbatches."""
    lay = Layout(gpus=8, seq_len=1024, global_batch=32, micro_batch=1)  # dp 8 (intra-node), m = 4
    unit = 7 / 8 * stage_params(GPT2, lay) * 2 / Network().intra_node
    rounds = {("deepspeed", 0): 2, ("deepspeed", 1): 2, ("deepspeed", 2): 5, ("deepspeed", 3): 12, ("fsdp", 0): 8 + 2}
    for (engine, zero), n in rounds.items():  # FSDP: 2m all-gathers in bf16 and one fp32 reduce-scatter (= 2 rounds)
        r = step_time(GPT2, dataclasses.replace(lay, engine=engine, zero=zero), PEAK)
        assert r["dp_comm_total_s"] == pytest.approx(n * unit), (engine, zero)
        if engine == "fsdp" or zero == 3:  # overlapped with compute: what does not fit under it, at least one layer's
            hidden = r["compute_s"] + r["fixed_s"]
            assert r["dp_comm_s"] == pytest.approx(max(n * unit - hidden, n * unit / 12)), (engine, zero)
        else:  # ZeRO 0-2 reduce after the backward and gather after the step
            assert r["dp_comm_s"] == r["dp_comm_total_s"], (engine, zero)


def test_fixed_choices_constrain_the_search() -> None:
    fixed = Constraints(tp=2, zero=1, micro_batch=2, recompute="full")
    rows = search(GPT2, Layout(gpus=8, seq_len=1024), 80 * GiB, PEAK, top=100, fixed=fixed)
    assert rows
    for r in rows:
        lay = r["layout"]
        assert (lay["tp"], lay["engine"], lay["zero"], lay["micro_batch"], lay["recompute"]) == \
            (2, "deepspeed", 1, 2, "full")
    assert {r["layout"]["pp"] for r in rows} > {1}  # pp is still enumerated
    fsdp = search(GPT2, Layout(gpus=8, seq_len=1024), 80 * GiB, PEAK, top=100, fixed=Constraints(engine="fsdp"))
    assert {r["layout"]["engine"] for r in fsdp} == {"fsdp"}
    with pytest.raises(PlanError, match=r"no valid layout on 8 GPUs with --tp 3: --gpus 8 is not divisible"):
        candidate_layouts(GPT2, Layout(gpus=8, global_batch=64), Constraints(tp=3))


def test_equal_time_rows_keep_the_smaller_one() -> None:
    rows = search(GPT2, Layout(gpus=8, seq_len=1024), 80 * GiB, PEAK, top=1000)
    keys = [(r["layout"]["tp"], r["layout"]["pp"], r["layout"]["micro_batch"], r["layout"]["recompute"],
             r["step_time_s"]) for r in rows]
    assert len(keys) == len(set(keys))  # ZeRO 0 beside ZeRO 1 (the same traffic, more memory) is left out


@pytest.mark.parametrize("kw,msg", [
    (dict(mfu=0.0), r"--mfu must be in \(0, 1\]"),
    (dict(mfu=1.5), r"--mfu must be in \(0, 1\]"),
    (dict(net=Network(inter_node=0.0)), "--inter-node-bandwidth must be a positive"),
    (dict(net=Network(intra_node=-1.0)), "--intra-node-bandwidth must be a positive"),
    (dict(layer_overhead_s=-1e-6), "--layer-overhead-us must be >= 0"),
    (dict(top=0), "--top must be a positive integer"),
])
def test_search_refuses_bad_rates(kw: dict, msg: str) -> None:
    with pytest.raises(PlanError, match=msg):
        search(GPT2, Layout(gpus=8, seq_len=1024), 80 * GiB, PEAK, **kw)


def test_search_refuses_zero_gpus() -> None:
    with pytest.raises(PlanError, match="--gpus must be a positive integer, got 0"):
        search(GPT2, Layout(gpus=0), 80 * GiB, PEAK)


def test_search_offers_only_layouts_training_can_run() -> None:
    """No ZeRO-3 beside TP, no ZeRO-2/3 beside PP, and no 1F1B with fewer microbatches than stages."""
    layouts = candidate_layouts(LLAMA, Layout(gpus=16, seq_len=8192, global_batch=8))
    assert layouts
    for lay in layouts:
        assert not (lay.engine == "deepspeed" and lay.tp > 1 and lay.zero == 3), lay.name()
        assert not (lay.engine == "deepspeed" and lay.pp > 1 and lay.zero >= 2), lay.name()
        assert not (lay.pp > 1 and lay.schedule == "1f1b" and lay.num_microbatches < lay.pp), lay.name()
    with pytest.raises(PlanError, match="parallel.zero_stage=3 with parallel.tp=2 is not supported"):
        Layout(gpus=8, tp=2, zero=3, seq_len=2048).validate(LLAMA)
    with pytest.raises(PlanError, match="1f1b needs at least parallel.pp=4 microbatches per step, got 2"):
        Layout(gpus=8, pp=4, seq_len=2048, global_batch=4).validate(LLAMA)
