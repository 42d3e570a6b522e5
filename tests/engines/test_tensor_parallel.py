"""Tensor parallelism trains exactly like one process, under every engine that takes it.

The parity runs compare every rank's shard (and replicated copy) of every gradient with one process's, from the
same weights, over the frozen-weights steps, and the losses of 4 training steps. Splitting a matmul over two ranks
changes the summation order, so gradients differ by a few ulps, which AdamW turns into update differences of up to
lr * dg / eps on near-zero elements: at the default eps of 1e-8 the untied, smoothed runs' losses drifted to 1.8e-5
from one process's by step 10 (fsdp2-tp2, hsdp2x1-tp2). The training pass therefore runs at eps = 1e-6, where they
stay within 1e-5; the frozen pass, at learning rate 0, compares the gradients whatever eps is.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import ConfigError, load_config
from megatron_lite.parity import compare_layouts, run_layout, run_ranks

from tests.engines.conftest import assert_layouts_match

TOLERANCE = 1e-5
STEPS = 4  # training steps (warm-up, then the decay), after the frozen-weights pass's 4 steps
TP_LAYOUTS = ["tp2", "tp2-sp", "ddp2-tp2", "zero1-tp2", "zero2-tp2", "fsdp2-tp2", "hsdp2x1-tp2"]
# Global batch 8 in two microbatches of 4 at dp 1 (one at dp 2): accumulation is covered, and each microbatch costs
# every layer's all-reduces. Two layers: every layer runs the same code and one feeds the next; more would only add
# collectives.
RUN = ["optimizer.eps=1e-6", "training.micro_batch_size=4", "model.num_layers=2"]


@pytest.mark.parametrize(
    "variant, extra, layouts",
    [
        ("tied", [], [*TP_LAYOUTS, "tp4"]),  # tp4: 2 kv heads over 4 ranks are replicated, each rank using one
        # untied: the engines that shard the separate output layer differently; zero2 and hsdp run above
        ("untied, label smoothing", ["model.tie_embeddings=false", "training.label_smoothing=0.1"],
         ["tp2", "tp2-sp", "ddp2-tp2", "zero1-tp2", "fsdp2-tp2"]),
    ],
)
def test_tensor_parallel_layouts_match_single(tiny_config, variant, extra, layouts):
    report = compare_layouts(tiny_config, layouts, steps=STEPS, overrides=[*RUN, *extra], timeout=300)
    print(f"\n{variant}\n" + report.table())
    assert_layouts_match(report, STEPS, TOLERANCE)


def test_zero3_with_tensor_parallelism_is_refused_in_one_line(tiny_config):
    report = compare_layouts(tiny_config, ["zero3-tp2"], steps=1, timeout=120)
    assert report.errors["zero3-tp2"].endswith(
        "parallel.zero_stage=3 with parallel.tp=2 is not supported: ZeRO-3 would partition the tensor-parallel shards "
        "again; use zero_stage 1 or 2, or parallel.engine=fsdp (FSDP2 over the data axis)"
    )


# ----------------------------------------------------------------------------------------------------------------------
# The vocab-parallel cross-entropy
# ----------------------------------------------------------------------------------------------------------------------


def _vocab_parallel_loss(rank: int, out: str) -> None:
    import torch.distributed as dist

    from megatron_lite.parallel.cross_entropy import vocab_parallel_loss_sum

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 64) * 4  # padded vocabulary 64, real vocabulary 57: the padding sits on rank 1
    labels = torch.randint(0, 57, (3, 7))
    labels[0, :3] = -100
    results = {}
    for eps in (0.0, 0.1):
        local = logits.chunk(2, dim=-1)[rank].clone().requires_grad_(True)
        total, count = vocab_parallel_loss_sum(local, labels, 32 * rank, 57, eps, dist.group.WORLD)
        total.backward()
        results[eps] = (total.item(), int(count), local.grad)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_vocab_parallel_cross_entropy_equals_the_full_one_with_smoothing_padding_and_ignored_labels(tmp_path):
    run_ranks(_vocab_parallel_loss, 2, (str(tmp_path),))
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 64) * 4
    labels = torch.randint(0, 57, (3, 7))
    labels[0, :3] = -100
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for eps in (0.0, 0.1):
        full = logits.clone().requires_grad_(True)
        want = F.cross_entropy(full[..., :57].reshape(-1, 57), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=eps, reduction="sum")
        want.backward()
        for r in range(2):
            total, count, grad = ranks[r][eps]
            assert total == pytest.approx(want.item(), rel=1e-6) and count == 18
            torch.testing.assert_close(grad, full.grad.chunk(2, dim=-1)[r], rtol=1e-5, atol=1e-6)
        assert ranks[1][eps][2][..., 25:].abs().max() == 0  # padding columns: no gradient


# ----------------------------------------------------------------------------------------------------------------------
# Dropout: masks differ across TP ranks on split activations and agree on replicated ones
# ----------------------------------------------------------------------------------------------------------------------


def _masks(rank: int, out: str) -> None:
    import torch.distributed as dist

    from megatron_lite.parallel.random import sharded_rng

    dist.init_process_group("gloo")
    torch.manual_seed(5)  # the trainer seeds every rank of a TP group alike
    replicated = F.dropout(torch.ones(64), 0.5)
    with sharded_rng(rank, torch.device("cpu")):
        split = F.dropout(torch.ones(64), 0.5)
    after = F.dropout(torch.ones(64), 0.5)
    torch.manual_seed(5)  # a recomputation restores the default generator: the region replays its mask
    F.dropout(torch.ones(64), 0.5)
    with sharded_rng(rank, torch.device("cpu")):
        replay = F.dropout(torch.ones(64), 0.5)
    torch.save({"replicated": replicated, "split": split, "after": after, "replay": replay}, f"{out}/rank{rank}.pt")


def test_dropout_masks_differ_only_where_activations_are_split(tmp_path):
    run_ranks(_masks, 2, (str(tmp_path),))
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(a["replicated"], b["replicated"]) and torch.equal(a["after"], b["after"])
    assert not torch.equal(a["split"], b["split"])
    assert torch.equal(a["split"], a["replay"]) and torch.equal(b["split"], b["replay"])


@pytest.mark.parametrize("layout", ["tp2", "tp2-sp"])
def test_training_with_dropout_stays_finite_and_learns(tiny_config, layout):
    dropout = ["model.attention_dropout=0.1", "model.residual_dropout=0.1", "model.embedding_dropout=0.1",
               "training.train_steps=12", "training.eval_interval=0"]
    losses = run_layout(layout, tiny_config, dropout, timeout=300).losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_activation_checkpointing_replays_the_split_dropout_masks(tiny_config):
    """Recomputing a block in backward must draw the same attention and sequence dropout masks as its forward:
    with checkpointing on, the losses equal those without it, bit for bit."""
    dropout = ["model.attention_dropout=0.2", "model.residual_dropout=0.2", "training.train_steps=3",
               "training.eval_interval=0"]
    plain = run_layout("tp2-sp", tiny_config, dropout, timeout=300).losses
    checkpointed = run_layout("tp2-sp", tiny_config, [*dropout, "model.activation_checkpointing=true"],
                              timeout=300).losses
    assert checkpointed == plain


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: logical across TP sizes and engines; Hugging Face export after TP = 2
# ----------------------------------------------------------------------------------------------------------------------

SAVE_AT, TOTAL = 2, 4


@pytest.fixture(scope="module")
def saved(saved_runs):
    """4-step runs saving at step 2, per layout: (losses, checkpoint of step 2)."""
    return lambda layout: saved_runs(layout, RUN, SAVE_AT)


@pytest.mark.parametrize("saved_as, resumed_as", [("tp2", "single"), ("single", "tp2"), ("zero1-tp2", "fsdp2")])
def test_resume_at_another_tensor_parallel_size_or_engine(saved, tiny_config, tmp_path, saved_as, resumed_as):
    reference, _ = saved("single")
    _, ckpt = saved(saved_as)
    resumed = run_layout(resumed_as, tiny_config, [*RUN, f"checkpoint.load={ckpt}"], timeout=300,
                         checkpoint_dir=tmp_path / "resumed").losses
    assert len(resumed) == TOTAL - SAVE_AT
    assert max(abs(a - b) for a, b in zip(resumed, reference[SAVE_AT:])) < TOLERANCE, (resumed, reference)


def test_tp2_checkpoint_exports_to_hugging_face_with_the_same_logits(saved, tiny_config):
    transformers = pytest.importorskip("transformers")
    from megatron_lite.convert import hf
    from megatron_lite.step.checkpoint_format import logical_keys, read_logical
    from megatron_lite.models import build_model

    _, ckpt = saved("tp2")
    cfg = load_config(tiny_config, RUN)
    model = build_model(cfg.model).eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert set(state) <= logical_keys(ckpt)
    read_logical(state, ckpt)  # full tensors, assembled from the two ranks' shards
    reference = build_model(cfg.model, seed=cfg.training.seed).state_dict()
    assert not torch.equal(model.state_dict()["layers.0.attn.o_proj.weight"], reference["layers.0.attn.o_proj.weight"])
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf.config_to_hf(cfg.model))).eval()
    hf_model.load_state_dict(hf.to_hf(model.state_dict(), cfg.model))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids)[..., : cfg.model.vocab_size], hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tp=8"], "model.num_heads=4 is not divisible by parallel.tp=8"),
        (["parallel.tp=4", "model.hidden_size=96", "model.num_heads=12", "model.num_kv_heads=6"],
         "model.num_kv_heads=6 with parallel.tp=4: the group must divide the kv heads"),
        (["parallel.tp=2", "model.ffn_hidden_size=511"], "model.ffn_hidden_size=511 is not divisible by parallel.tp=2"),
        (["parallel.tp=4", "model.pad_vocab_multiple=2", "model.vocab_size=510"],
         "the padded vocabulary (510 = model.vocab_size=510 rounded up to model.pad_vocab_multiple=2) is not divisible"),
        (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=31"],
         "parallel.sequence_parallel needs data.seq_len=31 divisible by parallel.tp=2"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tp > 1"),
    ],
)
def test_bad_tensor_parallel_settings_are_refused_in_one_line(tiny_config, overrides, message):
    from megatron_lite.rules import check_layout

    cfg = load_config(tiny_config, overrides)
    with pytest.raises(ConfigError) as info:
        check_layout(cfg, 2 * cfg.parallel.tp, "cpu")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_tp_wider_than_a_node_warns(monkeypatch):
    from megatron_lite.topology import check_tp_fits_node

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match=r"parallel.tp=4 spans more ranks than one node has \(2\)"):
        check_tp_fits_node(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tp_fits_node(2)
