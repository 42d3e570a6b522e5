"""Context parallelism trains exactly like one process: each sample's sequence split over cp ranks in load-balanced
chunks, attention over all-gathered keys and values with causal, document and padding masks, beside DDP, FSDP2,
DeepSpeed, TP (with SP) and PP; every tensor's gradient compared by the parity harness, 4 training steps."""

from __future__ import annotations

import pytest

from megatron_lite.config import ConfigError, load_config
from megatron_lite.parallel.context import ContextParallelDecoder, chunk_indices, split_sequence
from megatron_lite.parity import compare_layouts, run_layout
from megatron_lite.rules import check_layout

from tests.engines.conftest import assert_layouts_match, assert_refused_in_one_line

TOLERANCE = 1e-5
STEPS = 4  # training steps (warm-up, then the decay), after the frozen-weights pass's 4 steps
# Two microbatches per step where dp is 1, one where it is 2: accumulation is covered, and each microbatch costs
# every layer's key/value all-gather, so more of them would only slow the test; so would more than two layers (every
# layer runs the same code, and one feeds the next).
RUN = ["training.global_batch_size=16", "training.micro_batch_size=8", "training.eval_samples=16", "model.num_layers=2"]
GPT2_STYLE = ["model.position=learned", "model.norm=layernorm", "model.activation=gelu_tanh", "model.bias=true",
              "model.num_kv_heads=null", "model.tie_embeddings=true"]
LAYOUTS = ["cp2", "cp4", "ddp2-cp2", "fsdp2-cp2", "zero1-cp2", "tp2cp2-sp", "cp2pp2-1f1b"]  # tp2cp2: gpt2-style


@pytest.mark.parametrize(
    "variant, config, extra, layouts",
    [
        ("llama-style", "tiny_config", [], LAYOUTS),
        ("gpt2-style, tied", "tiny_config", GPT2_STYLE, ["cp2", "fsdp2-cp2", "tp2cp2", "cp2pp2-1f1b"]),
        ("documents", "tiny_config", ["data.reset_at_document=true"], ["cp2", "tp2cp2-sp"]),
        ("padded", "padded_config", [], ["cp2", "ddp2-cp2"]),
    ],
)
def test_context_parallel_layouts_match_single(request, variant, config, extra, layouts):
    report = compare_layouts(request.getfixturevalue(config), layouts, steps=STEPS, overrides=[*RUN, *extra],
                             timeout=300)
    print(f"\n{variant}\n" + report.table())
    assert_layouts_match(report, STEPS, TOLERANCE)


def test_a_mask_that_ignores_documents_is_caught(tiny_config, monkeypatch):
    """Planted: the context-parallel mask forgets the document ids, so tokens attend across documents; the per-tensor
    check names a tensor at the first frozen step."""
    real = ContextParallelDecoder.attention_mask

    def without_documents(self, position_ids, document_ids, padding_mask, device):
        return real(self, position_ids, None, padding_mask, device)

    monkeypatch.setattr(ContextParallelDecoder, "attention_mask", without_documents)
    report = compare_layouts(tiny_config, ["cp2"], steps=1, overrides=["data.reset_at_document=true"])
    assert report.failures() == ["cp2"]
    assert report.worst_tensor("cp2")[1].relative > 1e-3


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_every_rank_does_the_same_causal_work(cp):
    """Keys each query looks at under the causal mask, summed over a rank's queries: equal on every cp rank (the
    bound is one chunk's diagonal)."""
    import torch

    seq = 64 * cp
    ids = torch.arange(seq)[None]
    work = []
    for rank in range(cp):
        positions = split_sequence({"input_ids": ids}, cp, rank)["position_ids"]
        work.append(int((positions + 1).sum()))
    chunk = seq // (2 * cp)
    assert max(work) - min(work) < chunk * (chunk + 1) // 2, work
    assert chunk_indices(cp, 0) == (0, 2 * cp - 1)


SAVE_AT, TOTAL = 2, 4


@pytest.mark.parametrize("resumed_as", ["single", "tp2cp2"])
def test_a_cp2_checkpoint_resumes_at_another_layout(saved_runs, tiny_config, tmp_path, resumed_as):
    reference, _ = saved_runs("single", tuple(RUN), SAVE_AT)
    saved, ckpt = saved_runs("cp2", tuple(RUN), SAVE_AT)
    assert max(abs(a - b) for a, b in zip(saved, reference)) < TOLERANCE
    resumed = run_layout(resumed_as, tiny_config, [*RUN, f"checkpoint.load={ckpt}"], timeout=300,
                         checkpoint_dir=tmp_path / "resumed").losses
    assert len(resumed) == TOTAL - SAVE_AT
    assert max(abs(a - b) for a, b in zip(resumed, reference[SAVE_AT:])) < TOLERANCE, (resumed, reference)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.cp=2", "data.seq_len=30"], 2, "parallel.cp=2 needs data.seq_len=30 divisible by 2 x cp = 4"),
        (["parallel.cp=4", "parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_len=24"], 16,
         "each rank's 6 tokens must split over parallel.tp=4"),
        (["parallel.cp=2"], 3, "world size 3 is not divisible by parallel.tp=1 x parallel.pp=1 x parallel.cp=2"),
    ],
)
def test_bad_context_parallel_settings_are_refused_in_one_line(tiny_config, overrides, world, message):
    assert_refused_in_one_line(tiny_config, overrides, world, message)


def test_context_parallel_refuses_the_encoder_decoder():
    cfg = load_config(None, ["model.family=encoder_decoder", "data.objective=seq2seq", "parallel.cp=2",
                             "model.num_decoder_layers=2"])
    with pytest.raises(ConfigError, match="parallel.cp is not supported for model.family=encoder_decoder"):
        check_layout(cfg, 2, "cpu")


def _both_masks(rank: int, out: str) -> None:
    """On each of 2 cp ranks: the dense mask and the block mask (as dense) for documents and padding."""
    import torch
    import torch.distributed as dist
    from torch.nn.attention.flex_attention import create_mask

    from megatron_lite.parallel.context import _block_mask

    dist.init_process_group("gloo")
    s = 16
    mb = {"input_ids": torch.zeros(2, s, dtype=torch.long),
          "document_ids": torch.tensor([[0] * 5 + [1] * 11, [0] * 16]),
          "padding_mask": torch.tensor([[True] * 16, [True] * 12 + [False] * 4])}
    local = split_sequence(mb, 2, rank)
    decoder = ContextParallelDecoder()
    decoder.cp_group = dist.group.WORLD
    dense = decoder.attention_mask(local["position_ids"], local["document_ids"], local["padding_mask"],
                                   torch.device("cpu"))
    block = _block_mask(local["position_ids"], local["document_ids"], local["padding_mask"], dist.group.WORLD,
                        torch.device("cpu"))
    as_dense = create_mask(block.mask_mod, 2, 1, s // 2, s, device="cpu")
    torch.save({"dense": dense, "block": as_dense, "real": local["padding_mask"]}, f"{out}/rank{rank}.pt")


def test_the_block_mask_cuda_takes_is_the_dense_rule(tmp_path):
    """On CUDA the context-parallel mask is a FlexAttention block mask; it allows what the dense CPU mask allows for
    every real query (a padded query may also see itself: its output feeds no loss)."""
    import torch

    from megatron_lite.parity import run_ranks

    run_ranks(_both_masks, 2, (str(tmp_path),))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        real_rows = got["real"][:, None, :, None]
        assert torch.equal(got["dense"] & real_rows, got["block"] & real_rows), rank
