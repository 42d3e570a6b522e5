"""The planner offers exactly the layouts training runs: it asks training's own rules.

``megatron_lite.rules.check_layout`` is what the trainer and ``build_engine`` run before they build anything; nothing
else refuses a layout.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from megatron_lite.config import ConfigError, ModelConfig, load_config
from megatron_lite.rules import check_layout
from megatron_lite.planning.encdec import as_spec
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.layout import Layout
from megatron_lite.planning.presets import REFERENCE_PRESETS
from megatron_lite.planning.runnable import engine_config, refusal
from megatron_lite.planning.search import candidate_layouts, search

# 8 heads sharing 2 kv heads: tp 4 replicates the kv heads (each rank's 2 query heads share one), which training runs
GQA = ModelConfig(vocab_size=512, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=2, ffn_hidden_size=96,
                  max_seq_len=128, position="rotary", norm="rmsnorm", activation="swiglu", bias=False,
                  tie_embeddings=False)
LLAMA = REFERENCE_PRESETS["llama3-8b"]
ROOT = Path(__file__).resolve().parents[2]


def _engine_refuses(spec: ModelConfig, lay: Layout) -> bool:
    """Training's own answer, asked directly: the config training would get, through the trainer's check."""
    try:
        check_layout(engine_config(spec, lay), lay.gpus, "cuda")
    except ConfigError:
        return True
    return False


GRID = [dict(tp=tp, pp=pp, engine=eng, zero=zero, offload=off, dtype=dt, schedule=sched, global_batch=gb)
        for tp, pp, (eng, zero), off, dt, sched, gb in itertools.product(
            (1, 2, 4), (1, 2, 4), (("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3),
                                   ("fsdp", 0)),
            (None, "optimizer", "params"), ("bf16", "fp16"), ("1f1b", "interleaved"), (16, 32))]


def test_planner_refuses_exactly_what_training_refuses() -> None:
    """Over 1,080 layouts of a GQA model on 16 GPUs: the planner's answer is the engine check's, message included."""
    refused = accepted = 0
    for kw in GRID:
        lay = Layout(gpus=16, seq_len=128, micro_batch=1, virtual_stages=1 if kw["pp"] == 4 else 2, **kw)
        try:
            lay.validate(GQA)
        except PlanError as e:
            assert _engine_refuses(GQA, lay), (kw, str(e))
            reason = refusal(GQA, lay)
            assert reason and str(e).endswith(reason)
            refused += 1
        else:
            assert not _engine_refuses(GQA, lay), kw
            accepted += 1
    assert refused > 300 and accepted > 100  # both sides of the rule are exercised


@pytest.mark.parametrize("kw,reason", [
    (dict(tp=2, zero=3), "parallel.zero_stage=3 with parallel.tp=2 is not supported"),
    (dict(pp=2, zero=2, global_batch=16), "supports ZeRO stage 0 or 1 only"),
    (dict(pp=2, zero=1, dtype="fp16", global_batch=16), "training.precision=fp16 with parallel.pp=2"),
    (dict(engine="fsdp", dtype="fp16"), "not supported by parallel.engine=fsdp"),
    (dict(engine="fsdp", offload="optimizer"), "parallel.offload_optimizer is a DeepSpeed ZeRO setting"),
    (dict(zero=2, offload="params"), "parallel.offload_params needs parallel.zero_stage=3"),
    (dict(pp=4, global_batch=16, micro_batch=8), "1f1b needs at least parallel.pp=4 microbatches per step, got 1"),
])
def test_refusals_name_the_training_key(kw: dict, reason: str) -> None:
    lay = Layout(gpus=8, seq_len=2048, **kw)
    with pytest.raises(PlanError, match=f"training refuses .*{reason}"):
        lay.validate(LLAMA)


def test_layouts_the_old_copy_refused_are_offered() -> None:
    """The planner's own copy of the rules refused tp that does not divide the kv heads, and interleaved stages that
    do not divide the layers evenly; training runs both."""
    Layout(gpus=4, tp=4, seq_len=128).validate(GQA)  # 2 kv heads, tp 4: replicated
    Layout(gpus=3, pp=3, seq_len=128, schedule="interleaved", virtual_stages=1, global_batch=3).validate(
        dataclasses.replace(GQA, num_layers=4))  # 3 stages over 4 layers
    tps = {lay.tp for lay in candidate_layouts(GQA, Layout(gpus=8, seq_len=128, global_batch=32))}
    assert 4 in tps and 8 in tps  # 8 query heads; 2 kv heads, replicated


def test_search_ranks_only_runnable_layouts() -> None:
    """Llama-3 8B on 8 GPUs: every ranked layout passes the engine check, and FSDP never appears with dp = 1."""
    rows = search(LLAMA, Layout(gpus=8, seq_len=8192), 80 * 2**30, 989e12, top=1000)
    assert rows
    for r in rows:
        lay = Layout(gpus=8, **{k: r["layout"][k] for k in ("tp", "pp", "engine", "zero", "micro_batch", "seq_len",
                                                             "global_batch", "recompute", "schedule", "dtype")})
        assert not _engine_refuses(LLAMA, lay), r["layout"]
        assert not (lay.engine == "fsdp" and lay.dp == 1), r["layout"]
    assert {r["layout"]["pp"] for r in rows} > {1}  # pipeline layouts are runnable now, and ranked


T5_YAML = ROOT / "configs" / "models" / "t5-v1_1-small.yaml"  # 6 heads, d_ff 1024, span corruption of 512 inputs


def _training_refusal(lay: Layout) -> str | None:
    """What training says about ``lay`` for the T5 config, asked the way a user's run is: the YAML with the layout as
    overrides (``load_config`` validates it), then the trainer's engine check."""
    overrides = [f"parallel.engine={lay.engine}", f"parallel.zero_stage={lay.zero}", f"parallel.tp={lay.tp}",
                 f"parallel.pp={lay.pp}", f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()}",
                 f"training.precision={lay.dtype}", f"training.global_batch_size={lay.global_batch}",
                 f"training.micro_batch_size={lay.micro_batch}", f"training.eval_samples={lay.global_batch}"]
    try:
        check_layout(load_config(T5_YAML, overrides), lay.gpus, "cuda")
    except ConfigError as e:
        return str(e).splitlines()[0].removeprefix(f"{T5_YAML}: ")
    return None


def test_encoder_decoder_layouts_are_judged_by_training() -> None:
    """T5 v1.1 small from its YAML, over 240 layouts: the planner refuses exactly what training refuses (a tp that
    does not divide the 6 heads, sequence parallelism, ZeRO-3 with tp, fp16 under FSDP2, and whatever training
    says about pipeline stages), with training's message."""
    spec = as_spec(load_config(T5_YAML).model)
    seen: set[str] = set()
    accepted = 0
    for tp, pp, (eng, zero), sp, dt in itertools.product(
            (1, 2, 3, 4), (1, 2), (("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 3), ("fsdp", 0)),
            (False, True), ("bf16", "fp16")):
        lay = Layout(gpus=12 * pp if tp == 3 else 8 * pp, tp=tp, pp=pp, engine=eng, zero=zero,
                     sequence_parallel=sp, dtype=dt, seq_len=512, target_len=114, global_batch=48)
        expected = _training_refusal(lay)
        assert refusal(spec, lay) == expected, (tp, pp, eng, zero, sp, dt)
        if expected:
            seen.add(expected.split(" ", 1)[0])
        else:
            accepted += 1
    assert accepted > 10
    assert {"model.num_heads=6", "parallel.sequence_parallel", "parallel.zero_stage=3"} <= seen, seen


def test_encoder_decoder_tensor_parallel_shapes_are_the_plan() -> None:
    """At tp 2 each rank holds half of every projection the family's plan splits and of the vocabulary; norms and
    T5's relative-position tables stay whole (each rank computes its heads from the whole table)."""
    from megatron_lite.planning.layout import stage_shapes
    from megatron_lite.planning.params import encdec_shapes

    spec = as_spec(load_config(T5_YAML).model)
    full = dict(encdec_shapes(spec))
    half = dict(stage_shapes(spec, 2, 1, 0))
    assert half.keys() == full.keys()
    assert half["layers.8.cross_attn.q_proj.weight"] == (192, 512) and half["layers.0.attn.o_proj.weight"] == (512, 192)
    assert half["layers.3.mlp.gate_proj.weight"] == (512, 512) and half["embed.weight"] == (16064, 512)
    assert half["encoder_pos_bias.weight"] == full["encoder_pos_bias.weight"] == (32, 6)
    assert half["final_norm.weight"] == (512,)


@pytest.mark.parametrize("preset,pp,schedule,v", [("gpt2-124m", 4, "1f1b", 1), ("llama3-8b", 4, "1f1b", 1),
                                                  ("llama3-8b", 2, "interleaved", 2), ("llama2-70b", 8, "zb", 2)])
def test_pipeline_split_is_trainings(preset: str, pp: int, schedule: str, v: int) -> None:
    """Each pipeline rank holds the layers training's own split gives it (``parallel.pipeline.split_layers`` over
    the block, first-stage and last-stage parameter counts of the real model on the meta device), not an even split:
    the embedding and head stages get fewer blocks."""
    from megatron_lite.models import construct
    from megatron_lite.parallel.pipeline import split_layers
    from megatron_lite.planning.layout import rank_layers
    from megatron_lite.planning.presets import get_preset

    spec = get_preset(preset)
    lay = Layout(gpus=pp, pp=pp, global_batch=4 * pp, schedule=schedule, virtual_stages=v)
    with torch.device("meta"):
        model = construct(spec)
    ranges = split_layers(engine_config(spec, lay), *model.stage_costs())
    expected = [sorted(i for st, r in enumerate(ranges) if st % pp == rank for i in r) for rank in range(pp)]
    assert rank_layers(spec, pp, lay) == expected
    if schedule == "1f1b":  # the embedding's stage holds fewer blocks than the next (not so with 16 stages of 70B)
        assert len(ranges[0]) < len(ranges[1])


@pytest.mark.parametrize("preset", ["t5-v1_1-small", "transformer-base"])
@pytest.mark.parametrize("pp,schedule,v", [(2, "1f1b", 1), (4, "1f1b", 1), (2, "interleaved", 2)])
def test_encoder_decoder_pipeline_ranks_hold_what_training_gives_them(preset: str, pp: int, schedule: str,
                                                                      v: int) -> None:
    """Each pipeline rank of an encoder-decoder holds, name by name, what ``parallel.pipeline.split_model`` leaves
    on that rank of the real model (blocks, the shared table and its copies, each stack's bias table, the norms and
    an untied or tied head)."""
    import types

    from megatron_lite.models import construct
    from megatron_lite.models.presets import PRESETS
    from megatron_lite.parallel.pipeline import split_model
    from megatron_lite.planning.layout import stage_shapes

    spec = as_spec(PRESETS[preset])
    lay = Layout(gpus=pp, pp=pp, schedule=schedule, virtual_stages=v, global_batch=4 * pp, seq_len=512,
                 target_len=114)
    cfg = engine_config(spec, lay)
    for rank in range(pp):
        with torch.device("meta"):
            model = construct(cfg.model)
        held = split_model(model, cfg, types.SimpleNamespace(pp=pp, pp_rank=rank)).holder
        assert sorted((n, tuple(p.shape)) for n, p in held.named_parameters()) == \
            sorted(stage_shapes(spec, 1, pp, rank, lay)), rank
