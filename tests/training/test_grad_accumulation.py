"""Gradient accumulation is a pure memory trade: 4 microbatches of 2 give the same step as one batch of 8."""

from __future__ import annotations

import torch

from .conftest import model_tensors, tiny_config
from megatron_lite.training.trainer import Trainer

ACC = "training.micro_batch_size=2"
BIG = "training.micro_batch_size=8"


def test_gradients_of_four_microbatches_of_two_equal_one_batch_of_eight(tmp_path, corpus) -> None:
    grads = {}
    for name, mbs in (("acc", ACC), ("big", BIG)):
        trainer = Trainer(tiny_config(tmp_path / name, corpus, "training.train_steps=1", mbs), log=lambda _: None)
        result = trainer.run()
        grads[name] = (result.losses[0], {n: p.grad.clone() for n, p in trainer.engine.model.named_parameters()})
    (loss_a, ga), (loss_b, gb) = grads["acc"], grads["big"]
    assert abs(loss_a - loss_b) <= 1e-6
    assert ga.keys() == gb.keys()
    worst = max((ga[n] - gb[n]).abs().max().item() for n in ga)
    assert worst <= 1e-6, f"gradients differ by {worst}"
    assert max(g.abs().max().item() for g in ga.values()) > 1e-3  # real gradients, not zeros


def test_losses_and_weights_of_four_microbatches_of_two_equal_one_batch_of_eight(make_run) -> None:
    # AdamW's first step is about lr * sign(g): where |g| is near eps, gradient differences at the rounding level turn
    # into weight differences of a sizeable fraction of lr. eps=1e-3 keeps the update a smooth function of the
    # gradient, so the comparison measures accumulation rather than that amplification.
    common = ("training.train_steps=3", "optimizer.eps=1e-3", "checkpoint.interval=1", "checkpoint.keep_last=5")
    acc = make_run("acc", *common, ACC)
    big = make_run("big", *common, BIG)
    assert len(acc.losses) == len(big.losses) == 3
    for a, b in zip(acc.losses, big.losses):
        assert abs(a - b) <= 1e-6, (acc.losses, big.losses)
    first = {}
    for step in (1, 2, 3):
        name = f"checkpoints/step_{step:08d}"
        wa, wb = model_tensors(acc.run_dir / name), model_tensors(big.run_dir / name)
        assert wa.keys() == wb.keys()
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst <= 1e-6, f"weights differ by {worst} after step {step}"
        first = first or wa
    assert any(not torch.equal(first[k], wa[k]) for k in wa)  # the steps moved the weights
