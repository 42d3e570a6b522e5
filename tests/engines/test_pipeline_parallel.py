"""Pipeline parallelism trains exactly like one process, for every schedule and beside DDP, FSDP2 and TP.

Runs use 4 microbatches per step on one pipeline (global batch 16, micro batch 4), 2 where two pipelines share the
batch: at least as many as stages on every layout here. pp4 runs 8 layers: ranks 1 and 2 are middle stages, and the
tied embedding is held by ranks 0 and 3 only. The padded-vocabulary run has 500 real tokens in 512 columns, the
padding on the last tensor-parallel rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_lite.parity import compare_layouts, parse_layout, run_layout, run_ranks

from tests.engines.conftest import assert_layouts_match

TOLERANCE = 1e-5
STEPS = 4  # training steps (warm-up, then the decay), after the frozen-weights pass's 4 steps
RUN = ["training.global_batch_size=16", "training.micro_batch_size=4"]
LAYOUTS = ["pp2-gpipe", "pp2-1f1b", "pp2-interleaved", "pp2-zb", "fsdp2-pp2-1f1b", "ddp2-pp2-1f1b", "zero1-pp2-1f1b",
           "tp2pp2-1f1b"]
GPT2_STYLE = ["model.position=learned", "model.norm=layernorm", "model.activation=gelu_tanh", "model.bias=true",
              "model.num_kv_heads=null", "model.tie_embeddings=true"]


@pytest.mark.parametrize(
    "variant, config, extra, layouts",
    [
        ("llama-style", "tiny_config", [], LAYOUTS),
        ("gpt2-style, tied", "tiny_config", GPT2_STYLE,
         ["pp2-1f1b", "pp2-interleaved", "fsdp2-pp2-interleaved", "fsdp2-pp2-1f1b", "zero0-pp2-1f1b"]),
        ("8 layers, 4 stages", "tiny_config", ["model.num_layers=8"], ["pp4-1f1b", "pp4-interleaved"]),
        ("padded vocabulary, label smoothing", "vocab500_config", ["training.label_smoothing=0.1"], ["tp2pp2-1f1b"]),
        # later stages receive hidden states split along the sequence, and positions and documents whole
        ("sequence parallel, documents", "tiny_config", ["data.reset_at_document=true"], ["tp2-sp-pp2-1f1b"]),
    ],
)
def test_pipeline_layouts_match_single(request, variant, config, extra, layouts):
    report = compare_layouts(request.getfixturevalue(config), layouts, steps=STEPS, overrides=[*RUN, *extra],
                             timeout=300)
    print(f"\n{variant}\n" + report.table())
    assert_layouts_match(report, STEPS, TOLERANCE)
    if "pp4-1f1b" in layouts:  # the tied embedding: a copy on the first and the last stage only
        holders = [h["coords"]["pp"] for h in report.holdings["pp4-1f1b"] if "embed.weight" in h["params"]]
        assert sorted(holders) == [0, 3], holders


# ----------------------------------------------------------------------------------------------------------------------
# What each rank holds; tied copies stay identical
# ----------------------------------------------------------------------------------------------------------------------


def _train_and_report(rank: int, config: str, overrides: list[str], out: str) -> None:
    """Train 6 steps; after each, record this rank's parameter names and a hash of its tied copy (if any)."""
    from tests.engines.conftest import engine_and_batches

    engine, loader = engine_and_batches(config, overrides, steps=6)
    copies = []
    for _ in range(6):
        engine.train_step(next(loader), lr=1e-2)
        params = dict(engine.model.named_parameters())
        tied = params.get("embed.weight", params.get("lm_head.weight"))
        copies.append(tied.detach().clone() if tied is not None else None)
    torch.save({"names": sorted(dict(engine.model.named_parameters())), "copies": copies},
               os.path.join(out, f"rank{rank}.pt"))


def test_each_stage_holds_only_its_layers_and_tied_copies_stay_bit_identical(tiny_config, tmp_path):
    layout = parse_layout("pp2-1f1b")
    run_ranks(_train_and_report, 2, (tiny_config, [*RUN, *layout.overrides], str(tmp_path)))
    first, last = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(n.startswith(("embed.", "layers.0.", "layers.1.")) for n in first["names"]), first["names"]
    assert all(n.startswith(("layers.2.", "layers.3.", "final_norm.", "lm_head.")) for n in last["names"]), last["names"]
    assert "lm_head.weight" in last["names"] and "embed.weight" in first["names"]
    for step, (a, b) in enumerate(zip(first["copies"], last["copies"])):
        assert torch.equal(a, b), f"tied copies differ after step {step + 1}"
    assert not torch.equal(first["copies"][0], first["copies"][-1])  # they did train


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints with global layer indices: resume at another pipeline size, with TP, under another engine
# ----------------------------------------------------------------------------------------------------------------------

SAVE_AT, TOTAL = 2, 4


@pytest.mark.parametrize(
    "saved_as, resumed_as",
    [("pp2-1f1b", "single"), ("pp2-1f1b", "tp2pp2-1f1b"), ("pp2-1f1b", "fsdp2"), ("pp2-1f1b", "zero1-pp2-interleaved"),
     ("zero1-pp2-1f1b", "single")],
)
def test_pp2_checkpoint_resumes_on_another_layout(saved_runs, tiny_config, tmp_path, saved_as, resumed_as):
    reference, _ = saved_runs("single", RUN, SAVE_AT)
    saved_losses, ckpt = saved_runs(saved_as, RUN, SAVE_AT)
    assert max(abs(a - b) for a, b in zip(saved_losses, reference)) < TOLERANCE
    resumed = run_layout(resumed_as, tiny_config, [*RUN, f"checkpoint.load={ckpt}"], timeout=300,
                         checkpoint_dir=tmp_path / "resumed").losses
    assert len(resumed) == TOTAL - SAVE_AT
    assert max(abs(a - b) for a, b in zip(resumed, reference[SAVE_AT:])) < TOLERANCE, (resumed, reference)


@pytest.mark.parametrize("resumed_as", ["pp2-interleaved", "zero1-pp2-1f1b"])
def test_single_checkpoint_resumes_under_the_pipeline(saved_runs, tiny_config, tmp_path, resumed_as):
    reference, ckpt = saved_runs("single", RUN, SAVE_AT)
    resumed = run_layout(resumed_as, tiny_config, [*RUN, f"checkpoint.load={ckpt}"], timeout=300,
                         checkpoint_dir=tmp_path / "resumed").losses
    assert max(abs(a - b) for a, b in zip(resumed, reference[SAVE_AT:])) < TOLERANCE, (resumed, reference)


def test_explicit_stage_list_and_uneven_stages(tiny_config):
    report = compare_layouts(tiny_config, ["pp2-1f1b"], steps=3, overrides=[*RUN, "parallel.pp_layers=[1,3]"])
    assert not report.errors and report.failures(TOLERANCE) == [], report.table()


def test_balanced_split_counts_the_embedding_and_the_head():
    from megatron_lite.config import load_config
    from megatron_lite.parallel.pipeline import split_layers

    cfg = load_config(None, ["parallel.pp=2", "model.num_layers=8"])
    assert [len(r) for r in split_layers(cfg, 10, 0, 0)] == [4, 4]
    assert [len(r) for r in split_layers(cfg, 10, 30, 0)] == [3, 5]  # a heavy embedding: fewer blocks first
    assert [len(r) for r in split_layers(cfg, 10, 0, 30)] == [6, 2]  # largest stage 60 either way: earlier fills first
    cfg = load_config(None, ["parallel.pp=2", "parallel.pp_schedule=interleaved", "model.num_layers=8"])
    assert [r.start for r in split_layers(cfg, 10, 0, 0)] == [0, 2, 4, 6]


# ----------------------------------------------------------------------------------------------------------------------
# Static stage shapes: no shapes exchanged at start, and a wrong declaration named on the rank that sends
# ----------------------------------------------------------------------------------------------------------------------


def _refuse_shape_exchange(monkeypatch) -> None:
    """Planted: torch's start-up exchange of shapes between stages (its dynamic mode) raises on any rank."""
    from torch.distributed.pipelining.stage import PipelineStage

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline stage exchanged shapes at start")

    monkeypatch.setattr(PipelineStage, "_send_meta", refuse)
    monkeypatch.setattr(PipelineStage, "_recv_meta", refuse)


def _train_then_evaluate(rank: int, config: str, overrides: list[str], out: str) -> None:
    from tests.engines.conftest import engine_and_batches

    engine, loader = engine_and_batches(config, overrides, steps=3)
    losses = [engine.train_step(next(loader), lr=1e-2).loss for _ in range(2)]
    valid = engine.eval_loss(next(loader))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"train": losses, "valid": float(valid)}))


@pytest.mark.parametrize("layout", ["pp2-1f1b", "pp2-interleaved"])
def test_stages_train_and_evaluate_from_static_shapes(tiny_config, tmp_path, monkeypatch, layout):
    """No stage sends another its shapes at start (the exchange is planted to fail), for training and then
    evaluation (forward only), and both give one process's losses."""
    _refuse_shape_exchange(monkeypatch)
    (tmp_path / "single").mkdir(), (tmp_path / "pp").mkdir()
    run_ranks(_train_then_evaluate, 1, (tiny_config, RUN, str(tmp_path / "single")))
    run_ranks(_train_then_evaluate, 2, (tiny_config, [*RUN, *parse_layout(layout).overrides], str(tmp_path / "pp")))
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    piped = json.loads((tmp_path / "pp" / "rank0.json").read_text())
    assert max(abs(a - b) for a, b in zip(piped["train"], single["train"])) < TOLERANCE, (piped, single)
    assert abs(piped["valid"] - single["valid"]) < TOLERANCE, (piped, single)


def test_each_engine_and_precision_sends_what_its_stages_declare(tiny_config, monkeypatch):
    """The declared dtype of what crosses a stage boundary depends on the engine and precision (fp32 residuals under
    autocast, bf16 under FSDP2's policy and DeepSpeed bf16); every stage's output is checked against it."""
    _refuse_shape_exchange(monkeypatch)
    layouts = ["pp2-1f1b", "fsdp2-pp2-1f1b", "zero1-pp2-1f1b", "tp2-sp-pp2-1f1b"]
    report = compare_layouts(tiny_config, layouts, steps=1, grad_steps=1,
                             overrides=[*RUN, "training.precision=bf16"], timeout=300)
    assert not report.errors, report.errors
    assert all(report.problems(name, 1e-3, 5e-2) == [] for name in layouts), report.table(1e-3, 5e-2)


def test_a_wrong_declaration_fails_on_the_sending_stage_naming_it(tiny_config, tmp_path, monkeypatch):
    """Planted: the pipeline declares bf16 hidden states for an fp32 run; stage 0 fails before it sends."""
    import megatron_lite.parallel.pipeline as pipeline

    monkeypatch.setattr(pipeline, "boundary_dtypes", lambda cfg: (torch.bfloat16, torch.bfloat16))
    with pytest.raises(Exception) as failed:
        run_ranks(_train_then_evaluate, 2, (tiny_config, [*RUN, *parse_layout("pp2-1f1b").overrides], str(tmp_path)))
    assert "pipeline stage 0 returned float32[4, 32, 128] but declared bfloat16[4, 32, 128]" in str(failed.value)
