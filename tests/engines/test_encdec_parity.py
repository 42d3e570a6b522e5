"""The encoder-decoder family trains like one process under every engine: a tiny T5 v1.1 on padded seq2seq pairs
(sources and targets of uneven length), 4 microbatches per step on each of 2 data-parallel ranks, label smoothing
0.1 and the inverse-square-root schedule; the first step's loss is also computed by hand over real target tokens.
The original-Transformer style (tied, scaled embeddings, post-norm, biases) runs under tensor parallelism too.
Pipeline layouts run 4 microbatches per step (micro batch 2), encoder stages first, then decoder stages."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import load_config
from megatron_lite.data import GlobalBatchLoader, IndexedDatasetWriter, build_datasets
from megatron_lite.data.seq2seq import target_prefix
from megatron_lite.models.encoder_decoder import EncoderDecoderLM, build_encoder_decoder, shift_right
from megatron_lite.parity import compare_layouts

TOLERANCE = 1e-5
LAYOUTS = ["single", "ddp2", "zero3", "fsdp2", "tp2"]
VOCAB = 128


@pytest.fixture(scope="module")
def encdec_config(tmp_path_factory) -> str:
    """A ~60k-parameter T5 v1.1 on 300 reversal pairs of 3-24 tokens, global batch 8 in microbatches of 1."""
    root = tmp_path_factory.mktemp("encdec")
    prefix = str(root / "reverse")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16, vocab_size=VOCAB) as ws, \
            IndexedDatasetWriter(target_prefix(prefix), np.uint16, vocab_size=VOCAB) as wt:
        for _ in range(300):
            x = rng.integers(3, VOCAB, int(rng.integers(3, 24)))
            ws.add_document(np.append(x, 0))
            wt.add_document(np.append(x[::-1], 0))
    path = root / "t5.yaml"
    path.write_text(
        "model:\n"
        "  family: encoder_decoder\n  vocab_size: 128\n  hidden_size: 32\n  num_layers: 2\n  num_decoder_layers: 2\n"
        "  num_heads: 4\n  kv_channels: 8\n  ffn_hidden_size: 64\n  max_seq_len: 64\n  position: relative\n"
        "  relative_attention_num_buckets: 8\n  relative_attention_max_distance: 32\n  norm: rmsnorm\n"
        "  norm_eps: 1.0e-6\n  activation: geglu\n  bias: false\n  tie_embeddings: false\n"
        "  scale_attn_logits: false\n  decoder_start_token_id: 1\n"
        "data:\n"
        f"  prefixes: {prefix}\n  cache_dir: {root / 'index-cache'}\n  objective: seq2seq\n  seq_len: 24\n"
        "  target_seq_len: 24\n  split: 90,10,0\n"
        "training:\n  global_batch_size: 8\n  micro_batch_size: 1\n  label_smoothing: 0.1\n  eval_interval: 0\n"
        "  eval_samples: 8\n"
        "schedule:\n  kind: inverse_sqrt\n  warmup_steps: 2\n"
        "optimizer:\n  lr: 3.0e-3\n"
        "logging:\n  wandb_mode: disabled\n"
    )
    return str(path)


def _first_step_by_hand(config: str) -> tuple[float, list[int]]:
    """Summed smoothed token loss of global batch 0 over its real target tokens / their number, from the weights
    every engine starts with; and the real target tokens per microbatch."""
    cfg = load_config(config)
    model = build_encoder_decoder(cfg.model, seed=cfg.training.seed)
    data = build_datasets(cfg.data, {"train": cfg.global_batch_size}, log=lambda *_: None)["train"]
    loader = GlobalBatchLoader(data, cfg.global_batch_size, cfg.training.micro_batch_size, 0, 1, prefetch=0)
    total, counts = 0.0, []
    with torch.no_grad():
        for mb in next(iter(loader)):
            dec = shift_right(mb["labels"], cfg.model.decoder_start_token_id)
            logits = model(mb["input_ids"], dec, padding_mask=mb["padding_mask"])[..., :VOCAB]
            total += F.cross_entropy(logits.double().flatten(0, 1), mb["labels"].flatten(), label_smoothing=0.1,
                                     reduction="sum").item()
            counts.append(int((mb["labels"] != -100).sum()))
    return total / sum(counts), counts


def test_encoder_decoder_layouts_match_single_and_by_hand(encdec_config):
    by_hand, counts = _first_step_by_hand(encdec_config)
    assert len(counts) == 8 and len(set(counts)) > 1  # microbatches hold different numbers of real targets
    report = compare_layouts(encdec_config, LAYOUTS, steps=3, timeout=300)
    print("\n" + report.table())
    assert not report.errors, report.errors
    assert report.failures(TOLERANCE) == [], report.table()
    assert abs(report.losses["single"][0] - by_hand) < TOLERANCE
    assert report.losses["single"][2] < report.losses["single"][0]  # and it learns


TRANSFORMER_STYLE = [
    "model.position=sinusoidal", "model.norm=layernorm", "model.norm_position=post", "model.activation=relu",
    "model.bias=true", "model.tie_embeddings=true", "model.scale_embeddings=true", "model.scale_attn_logits=true",
    "model.kv_channels=null", "model.init_std=0.1",
]


def test_transformer_style_under_tensor_parallelism(encdec_config):
    report = compare_layouts(encdec_config, ["single", "tp2", "zero2-tp2"], steps=3, timeout=300,
                             overrides=TRANSFORMER_STYLE)
    print("\n" + report.table())
    assert not report.errors, report.errors
    assert report.failures(TOLERANCE) == [], report.table()


def test_unsupported_layouts_are_refused_in_one_line(encdec_config):
    report = compare_layouts(encdec_config, ["tp2-sp", "pp2-zb", "fsdp2-pp2-interleaved"], steps=1, timeout=120)
    assert "sequence_parallel is not supported for model.family=encoder_decoder" in report.errors["tp2-sp"]
    assert "parallel.pp_schedule=zb is not supported for model.family=encoder_decoder" in report.errors["pp2-zb"]
    # one block per stage: the encoder's and the decoder's first stages (0 and 2) share rank 0 and the embedding
    refused = report.errors["fsdp2-pp2-interleaved"]
    assert "stages 0 and 2 (blocks 0-0 and 2-2) share embed on pipeline rank 0" in refused


def test_resume_on_another_layout_continues(encdec_config, tmp_path):
    """A checkpoint saved under ZeRO-3 on 2 ranks (step 2 of 4) resumes under tensor parallelism with the losses of
    the uninterrupted run: the family's checkpoints are layout-free like the decoder's."""
    from megatron_lite.parity import run_layout

    run = ["optimizer.eps=1e-5", "training.train_steps=4"]  # eps: see tests/engines/test_resume.py
    whole = run_layout("single", encdec_config, run, timeout=300).losses
    saved = run_layout("zero3", encdec_config, [*run, "checkpoint.interval=2", "training.train_steps=2"],
                       timeout=300, checkpoint_dir=tmp_path / "zero3")
    assert len(saved.losses) == 2
    resumed = run_layout("tp2", encdec_config, [*run, f"checkpoint.load={tmp_path / 'zero3' / 'step_00000002'}"],
                         timeout=300, checkpoint_dir=tmp_path / "tp2").losses
    assert len(whole) == 4 and len(resumed) == 2
    assert max(abs(a - b) for a, b in zip(saved.losses + resumed, whole)) < TOLERANCE


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline parallelism: encoder stages, then decoder stages, the encoder output travelling with the activations
# ----------------------------------------------------------------------------------------------------------------------

PP_RUN = ["training.micro_batch_size=2"]  # 4 microbatches per step on one pipeline
ORIGINAL_T5 = ["model.tie_embeddings=true", "model.scale_decoder_output=true"]


@pytest.mark.parametrize(
    "variant, extra, layouts, steps",
    [
        ("t5 v1.1", [], ["pp2-1f1b", "pp2-gpipe", "pp2-interleaved", "tp2pp2-1f1b"], 3),
        # 4 microbatches per rank on each of 2 data-parallel ranks
        ("t5 v1.1, data x pipeline", ["training.micro_batch_size=1"], ["fsdp2-pp2-1f1b", "ddp2-pp2-1f1b",
                                                                       "zero1-pp2-1f1b"], 6),
        ("transformer", TRANSFORMER_STYLE, ["pp2-1f1b", "pp2-gpipe", "zero0-pp2-1f1b"], 3),
        # the encoder's bias table on both ranks (layer 0 | layers 1-3), and a decoder spanning the cut (0-2 | 3)
        # with the embedding and the tied head on both
        ("t5 v1.1, cut inside the encoder", ["parallel.pp_layers=[1,3]"], ["pp2-1f1b"], 3),
        ("original t5, cut inside the decoder", [*ORIGINAL_T5, "parallel.pp_layers=[3,1]"], ["pp2-1f1b", "pp2-gpipe"],
         3),
    ],
)
def test_pipeline_layouts_match_single(encdec_config, variant, extra, layouts, steps):
    report = compare_layouts(encdec_config, layouts, steps=steps, timeout=300, overrides=[*PP_RUN, *extra])
    print(f"\n{variant}\n" + report.table())
    assert not report.errors, report.errors
    assert all(len(v) == steps for v in report.losses.values())
    assert report.failures(TOLERANCE) == [], report.table()


def test_half_precision_engines_send_what_their_stages_declare(encdec_config):
    """FSDP2's bf16 policy and DeepSpeed bf16 send (decoder hidden states, encoder output) in bf16 between stages; a
    stage whose output differs from its declaration fails (``parallel/pipeline.py``)."""
    layouts = ["fsdp2-pp2-1f1b", "zero1-pp2-1f1b"]
    report = compare_layouts(encdec_config, layouts, steps=1, grad_steps=1, timeout=300,
                             overrides=[*PP_RUN, "training.micro_batch_size=1", "training.precision=bf16"])
    assert not report.errors, report.errors
    assert all(report.problems(name, 5e-3, 1e-1) == [] for name in layouts), report.table(5e-3, 1e-1)


def test_each_stage_holds_its_blocks_and_the_parts_they_use(encdec_config):
    """Interleaved over 2 ranks, one block per stage: stages 0-1 hold the encoder's blocks, 2-3 the decoder's; each
    stack's bias table is on both ranks (tied copies), the embedding only on rank 0, which embeds both stacks."""
    from types import SimpleNamespace

    from megatron_lite.parallel.pipeline import split_model

    cfg = load_config(encdec_config, ["parallel.pp=2", "parallel.pp_schedule=interleaved"])
    held = {}
    for rank in range(2):
        with torch.device("meta"):
            model = EncoderDecoderLM(cfg.model)
        parts = split_model(model, cfg, SimpleNamespace(pp=2, pp_rank=rank))
        held[rank] = parts
        assert parts.indices == [rank, rank + 2]
    contents = {s: (list(view.model.layers), sorted(n for n, _ in view.model.named_children() if n != "layers"))
                for parts in held.values() for s, view in zip(parts.indices, parts.stages)}
    assert contents == {
        0: (["0"], ["dropout", "embed", "encoder_pos_bias"]),
        1: (["1"], ["dropout", "encoder_norm", "encoder_pos_bias"]),
        2: (["2"], ["decoder_pos_bias", "dropout", "embed"]),
        3: (["3"], ["decoder_pos_bias", "dropout", "final_norm", "lm_head"]),
    }, contents
    assert sorted(n for n, _ in held[0].holder.named_children()) == [
        "decoder_pos_bias", "dropout", "embed", "encoder_pos_bias", "layers"]
    for rank, parts in held.items():
        assert [(t.ranks, t.name, t.primary) for t in parts.tied] == [
            ((0, 1), "encoder_pos_bias.weight", rank == 0), ((0, 1), "decoder_pos_bias.weight", rank == 0)]
        assert parts.copies == {"encoder_pos_bias.weight": 2, "decoder_pos_bias.weight": 2}


def test_balanced_split_weighs_each_block_and_the_embedding_copy():
    """T5 v1.1 small at pp2: decoder blocks are a third larger than encoder blocks, and the stage that embeds the
    decoder's input holds a copy of the 16M-parameter embedding; balancing both puts the first decoder block on
    the first stage, and the two ranks end up within 0.1% of each other."""
    from pathlib import Path
    from types import SimpleNamespace

    from megatron_lite.parallel.pipeline import split_model

    yaml = Path(__file__).resolve().parents[2] / "configs" / "models" / "t5-v1_1-small.yaml"
    cfg = load_config(yaml, ["parallel.pp=2", "data.objective=span_corruption"])
    held = []
    for rank in range(2):
        with torch.device("meta"):
            model = EncoderDecoderLM(cfg.model)
        holder = split_model(model, cfg, SimpleNamespace(pp=2, pp_rank=rank)).holder
        held.append((list(holder.layers), sum(p.numel() for p in holder.parameters())))
    assert [layers for layers, _ in held] == [[str(i) for i in range(9)], [str(i) for i in range(9, 16)]]
    assert abs(held[0][1] - held[1][1]) < 1e-3 * held[0][1], held


def _train_and_report(rank: int, config: str, overrides: list[str], out: str) -> None:
    """Train 4 steps under the pipeline; after each, keep this rank's copies of the tied tensors."""
    from tests.engines.conftest import engine_and_batches

    engine, loader = engine_and_batches(config, overrides, steps=4)
    copies = []
    for _ in range(4):
        engine.train_step(next(loader), lr=1e-2)
        params = dict(engine.model.named_parameters())
        copies.append({t.name: params[t.name].detach().clone() for t in engine.pipeline.parts.tied if t.name})
    torch.save({"names": sorted(dict(engine.model.named_parameters())), "copies": copies},
               os.path.join(out, f"rank{rank}.pt"))


def test_tied_copies_stay_bit_identical(encdec_config, tmp_path):
    """The original T5 cut after layer 0: the shared embedding (encoder input on rank 0; decoder input and tied
    head on rank 1) and the encoder's bias table (both ranks run encoder blocks) are copies on both ranks."""
    from megatron_lite.parity import parse_layout, run_ranks

    overrides = [*PP_RUN, *ORIGINAL_T5, "parallel.pp_layers=[1,3]", *parse_layout("pp2-1f1b").overrides]
    run_ranks(_train_and_report, 2, (encdec_config, overrides, str(tmp_path)))
    first, last = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert first["names"] == sorted(["embed.weight", "encoder_pos_bias.weight", *_block("0", encoder=True)])
    assert last["names"] == sorted(["decoder_pos_bias.weight", "embed.weight", "encoder_norm.weight",
                                    "encoder_pos_bias.weight", "final_norm.weight", *_block("1", encoder=True),
                                    *_block("2"), *_block("3")])
    for step, (a, b) in enumerate(zip(first["copies"], last["copies"])):
        assert sorted(a) == sorted(b) == ["embed.weight", "encoder_pos_bias.weight"]
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name}: the copies differ after step {step + 1}"
    assert all(not torch.equal(first["copies"][0][n], first["copies"][-1][n]) for n in first["copies"][0])


def _block(i: str, encoder: bool = False) -> list[str]:
    linears = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj"]
    norms = ["attn_norm", "mlp_norm"]
    if not encoder:
        linears += ["cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj"]
        norms += ["cross_norm"]
    return [f"layers.{i}.{n}.weight" for n in linears + norms]


@pytest.mark.parametrize("saved_as, resumed_as", [("pp2-1f1b", "single"), ("fsdp2-pp2-1f1b", "pp2-gpipe")])
def test_pipeline_checkpoint_resumes_on_another_layout(encdec_config, tmp_path, saved_as, resumed_as):
    """Saved under the pipeline cut after layer 0 (step 2 of 4; the tied embedding and the encoder's bias table on
    both ranks), resumed at pp1, or at pp2 cut in the middle: the losses of the uninterrupted run, since names and
    shapes are the whole model's."""
    from megatron_lite.parity import run_layout

    run = [*PP_RUN, *ORIGINAL_T5, "optimizer.eps=1e-5", "training.train_steps=4"]
    whole = run_layout("single", encdec_config, run, timeout=300).losses
    saved = run_layout(saved_as, encdec_config, [*run, "parallel.pp_layers=[1,3]", "checkpoint.interval=2",
                                                 "training.train_steps=2"],
                       timeout=300, checkpoint_dir=tmp_path / "saved")
    resumed = run_layout(resumed_as, encdec_config, [*run, f"checkpoint.load={tmp_path / 'saved' / 'step_00000002'}"],
                         timeout=300, checkpoint_dir=tmp_path / "resumed").losses
    assert len(whole) == 4 and len(saved.losses) == 2 and len(resumed) == 2
    assert max(abs(a - b) for a, b in zip(saved.losses + resumed, whole)) < TOLERANCE, (saved.losses, resumed, whole)
