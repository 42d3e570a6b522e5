"""Mixed precision, loss scaling, label smoothing and weight-decay groups, through the engine the trainer uses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from .conftest import tiny_config
from megatron_lite.config import OptimizerConfig, load_config
from megatron_lite.data import GlobalBatchLoader
from megatron_lite.models import build_model
from megatron_lite.step.optim import param_groups
from megatron_lite.training.trainer import Trainer, train

QUIET = {"log": lambda _: None}
STEPS = "training.train_steps=4"


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, corpus):
    return train(tiny_config(tmp_path_factory.mktemp("fp32") / "run", corpus, STEPS), **QUIET)


@pytest.mark.parametrize("precision, tol", [("bf16", 5e-3), ("fp16", 5e-3)])
def test_autocast_gives_finite_losses_close_to_fp32(tmp_path, corpus, fp32_run, precision, tol) -> None:
    res = train(tiny_config(tmp_path / precision, corpus, STEPS, f"training.precision={precision}"), **QUIET)
    assert len(res.losses) == 4 and all(math.isfinite(x) for x in res.losses)
    assert res.losses == pytest.approx(fp32_run.losses, abs=tol)
    assert res.losses != fp32_run.losses  # autocast really changed the arithmetic
    assert res.valid_losses[-1][1] == pytest.approx(fp32_run.valid_losses[-1][1], abs=tol)


def test_fp16_loss_scaling_skips_overflowing_steps_and_backs_off(tmp_path, corpus) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", corpus, "training.train_steps=3", "training.precision=fp16"),
                      **QUIET)
    engine = trainer.engine
    assert engine.scaler is not None and engine.autocast_dtype == torch.float16
    # fp16 gradients overflow at this scale; a steep backoff reaches a working scale in a few steps
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    batch = next(iter(GlobalBatchLoader(trainer.datasets["train"], 8, 2, 0, 1, prefetch=0)))
    first = engine.train_step(batch, 1e-3)
    assert first.skipped and math.isfinite(first.loss)
    assert engine.scaler.get_scale() == 2.0**32  # backed off
    assert all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())  # the step was skipped
    for _ in range(6):  # the scale keeps backing off until the gradients fit, then steps go through
        m = engine.train_step(batch, 1e-3)
        if not m.skipped:
            break
    assert not m.skipped and math.isfinite(m.grad_norm)
    assert any(not torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())


def smoothed_ce_by_hand(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """(1 - eps) * NLL of the label + eps * mean over all classes of -log p."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    return ((1 - eps) * nll + eps * uniform).mean()


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the (tied) embedding so the initial logits are far from uniform, where smoothing changes the loss."""
    with torch.no_grad():
        model.embed.weight.mul_(30.0)
    return model


def test_label_smoothing_matches_the_formula_and_evaluation_stays_plain_cross_entropy(tmp_path, corpus) -> None:
    eps = 0.1
    trainer = Trainer(tiny_config(tmp_path / "ls", corpus, "training.train_steps=1",
                                  f"training.label_smoothing={eps}"), **QUIET)
    model = sharpen(trainer.engine.model)
    batch = next(iter(GlobalBatchLoader(trainer.datasets["train"], 8, 2, 0, 1, prefetch=0)))
    with torch.no_grad():
        logits = [model(mb["input_ids"]) for mb in batch]
        smooth = [smoothed_ce_by_hand(lg, mb["labels"], eps).item() for lg, mb in zip(logits, batch)]
        plain = [F.cross_entropy(lg.reshape(-1, lg.size(-1)), mb["labels"].reshape(-1)).item()
                 for lg, mb in zip(logits, batch)]
    expected_smooth, expected_plain = sum(smooth) / 4, sum(plain) / 4
    assert abs(expected_smooth - expected_plain) > 1e-2  # sharpened logits: 1000x the 1e-5 the checks below use

    valid = trainer.evaluate()  # before the step: the same initial weights
    res = trainer.run()
    assert res.losses[0] == pytest.approx(expected_smooth, abs=1e-5)  # the trained loss is the smoothed one

    plain_trainer = Trainer(tiny_config(tmp_path / "plain", corpus, "training.train_steps=1"), **QUIET)
    sharpen(plain_trainer.engine.model)
    assert plain_trainer.evaluate() == pytest.approx(valid, abs=1e-6)  # evaluation ignores smoothing
    assert plain_trainer.run().losses[0] == pytest.approx(expected_plain, abs=1e-5)


ALL_KINDS = ("model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
             "model.max_seq_len=64", "data.seq_len=32", "model.position=learned", "model.bias=true",
             "model.tie_embeddings=false", "optimizer.weight_decay=0.1")


def decay_of(*overrides: str) -> tuple[dict[str, float], dict[str, int]]:
    """Parameter name -> (weight decay AdamW applies, ndim), for a tiny model with every kind of parameter."""
    cfg = load_config(None, [*ALL_KINDS, *overrides])
    model = build_model(cfg.model, device="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(p)]: g["weight_decay"] for g in param_groups(model, cfg.optimizer) for p in g["params"]}
    assert sorted(out) == sorted(names.values())  # every parameter once
    return out, {n: p.ndim for n, p in model.named_parameters()}


def kind(name: str, ndim: int) -> str:
    if name.startswith(("embed.", "pos_embed.")):
        return "embedding"
    if name.endswith(".bias"):
        return "bias"
    return "norm" if ndim == 1 else "matrix"


@pytest.mark.parametrize(
    "switches, no_decay_kinds",
    [
        ((), {"embedding", "bias", "norm"}),
        (("optimizer.no_decay_norms=false",), {"embedding", "bias"}),
        (("optimizer.no_decay_biases=false",), {"embedding", "norm"}),
        (("optimizer.no_decay_embeddings=false",), {"bias", "norm"}),
        (("optimizer.no_decay_norms=false", "optimizer.no_decay_biases=false", "optimizer.no_decay_embeddings=false"),
         set()),
    ],
)
def test_weight_decay_groups(switches, no_decay_kinds) -> None:
    decay, ndims = decay_of(*switches)
    seen = set()
    for name, wd in decay.items():
        k = kind(name, ndims[name])
        seen.add(k)
        assert wd == (0.0 if k in no_decay_kinds else 0.1), (name, k, wd)
    assert seen == {"embedding", "bias", "norm", "matrix"}  # the model had every kind
    assert decay["lm_head.weight"] == 0.1  # an untied output projection is a matrix like any other


def test_tied_embedding_appears_once_without_decay() -> None:
    cfg = load_config(None, ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                             "model.tie_embeddings=true", "model.max_seq_len=64", "data.seq_len=32"])
    model = build_model(cfg.model, device="cpu")
    assert model.lm_head.weight is model.embed.weight
    groups = param_groups(model, OptimizerConfig(weight_decay=0.1))
    flat = [(p, g["weight_decay"]) for g in groups for p in g["params"]]
    tied = [wd for p, wd in flat if p is model.embed.weight]
    assert tied == [0.0]


def test_engine_optimizer_uses_the_groups(tmp_path, corpus) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", corpus, "optimizer.weight_decay=0.05"), **QUIET)
    names = {id(p): n for n, p in trainer.engine.model.named_parameters()}
    wd = {names[id(p)]: g["weight_decay"] for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    assert wd["embed.weight"] == 0.0 and wd["final_norm.weight"] == 0.0
    assert wd["layers.0.attn.q_proj.weight"] == 0.05 and wd["layers.0.mlp.down_proj.weight"] == 0.05


def test_padded_vocabulary_columns_take_no_probability_mass() -> None:
    """The rows that pad the vocabulary to a multiple of 128 are left out of the softmax, smoothing included."""
    from megatron_lite.config import ModelConfig
    from megatron_lite.models import build_model
    from megatron_lite.step.tasks import CausalLMTask

    cfg = ModelConfig(vocab_size=500, hidden_size=32, num_layers=1, num_heads=2, max_seq_len=16, tie_embeddings=False)
    assert cfg.padded_vocab_size == 512
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight[500:].normal_(0.0, 3.0)  # padded columns would dominate the softmax if they were in it
    ids = torch.randint(0, 500, (2, 9))
    mb = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    output = model(mb["input_ids"])
    for eps in (0.0, 0.1):
        total, count = CausalLMTask(eps, cfg.vocab_size).loss(output, mb["labels"], training=True)
        got = total / count
        want = F.cross_entropy(output[..., :500].reshape(-1, 500), mb["labels"].reshape(-1), label_smoothing=eps)
        torch.testing.assert_close(got, want)
        full, _ = CausalLMTask(eps).loss(output, mb["labels"], training=True)  # no vocab_size: padding takes mass
        assert (full / count).item() > got.item() + 1.0


@pytest.mark.parametrize("device, fused_setting, expect_fused", [
    ("cuda", None, True), ("cpu", None, False), ("cuda", False, False), ("cpu", True, True),
])
def test_adamw_is_fused_on_gpu_by_default(device, fused_setting, expect_fused) -> None:
    """optimizer.fused=null picks the fused kernels exactly when training on a GPU; true/false force it."""
    from megatron_lite.step.optim import build_adamw

    model = build_model(load_config(None, ["model.vocab_size=64", "model.hidden_size=16", "model.num_layers=1",
                                           "model.num_heads=2", "model.max_seq_len=32", "data.seq_len=32"]).model)
    opt = build_adamw(model, OptimizerConfig(fused=fused_setting), torch.device(device))  # CPU params: fused runs
    assert bool(opt.defaults["fused"]) is expect_fused
