"""DeepSpeed checkpoints stay memory bounded: each rank keeps and writes only the tensors it owns, and a load reads the
logical tensors in groups of bounded size. The fp16 loss scaler's counters round-trip through JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import megatron_lite.engines.deepspeed_state as ds_state
import megatron_lite.engines.deepspeed as ds_engine
from megatron_lite.engines.logical import balance_owners, budget_groups
from megatron_lite.step.checkpoint_format import logical_keys
from megatron_lite.parity import run_layout

STEPS, SAVE_AT = 3, 2


def _record_calls(monkeypatch, name: str, log_dir: Path) -> None:
    """Wrap ``ds_state.<name>`` (write_logical / read_logical) so that each forked rank logs what it passes."""
    real = getattr(ds_state, name)

    def recorder(state: dict[str, torch.Tensor], path: Path) -> None:
        rank = int(os.environ.get("RANK", "0"))
        entry = {
            "path": Path(path).name,
            "bytes": {k: v.numel() * v.element_size() for k, v in state.items()},
            "devices": sorted({v.device.type for v in state.values()}),
        }
        with open(log_dir / f"{name}-rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        return real(state, path)

    monkeypatch.setattr(ds_state, name, recorder)


def _calls(log_dir: Path, name: str, rank: int) -> list[dict]:
    return [json.loads(line) for line in (log_dir / f"{name}-rank{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def zero3_run(tiny_config, tmp_path_factory):
    """A 3-step ZeRO-3 run on 2 ranks that saves at step 2, with every rank's write_logical calls recorded."""
    root = tmp_path_factory.mktemp("zero3-save")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _record_calls(monkeypatch, "write_logical", root)
        run = run_layout("zero3", tiny_config, [f"training.train_steps={STEPS}", f"checkpoint.interval={SAVE_AT}"],
                         timeout=300, checkpoint_dir=root / "ckpt")
    return run.losses, root / "ckpt" / f"step_{SAVE_AT:08d}", root


def test_each_rank_writes_only_the_tensors_it_owns(zero3_run):
    _, ckpt, root = zero3_run
    saves = [[c for c in _calls(root, "write_logical", rank) if c["path"].endswith(ckpt.name)][0] for rank in (0, 1)]
    keys = [set(s["bytes"]) for s in saves]
    assert not keys[0] & keys[1]  # each tensor held by one rank only, not assembled everywhere
    assert keys[0] | keys[1] == logical_keys(ckpt)  # and DCP wrote the union of the ranks' different key sets
    assert all(s["devices"] == ["cpu"] for s in saves)
    sizes = [sum(s["bytes"].values()) for s in saves]
    assert max(sizes) < 0.6 * sum(sizes), sizes  # bytes balanced over the ranks


def test_load_reads_bounded_groups_and_continues_exactly(zero3_run, tiny_config, tmp_path, monkeypatch):
    losses, ckpt, _ = zero3_run
    budget = 300_000  # below the tiny model's total, above most single parameters' weight + moments
    monkeypatch.setattr(ds_engine.DeepSpeedEngine, "load_budget_bytes", budget)
    _record_calls(monkeypatch, "read_logical", tmp_path)
    resumed = run_layout("zero3", tiny_config, [f"training.train_steps={STEPS}", f"checkpoint.load={ckpt}"],
                         timeout=300, checkpoint_dir=tmp_path / "resumed").losses
    assert resumed == losses[SAVE_AT:]
    for rank in (0, 1):
        reads = _calls(tmp_path, "read_logical", rank)
        assert len(reads) >= 4, len(reads)
        for read in reads:  # at most the budget, or one parameter (its weight, moments and step) alone
            params = [k for k in read["bytes"] if k.startswith("model.")]
            assert sum(read["bytes"].values()) <= budget or len(params) == 1, read["bytes"]


def test_ownership_and_groups():
    assert balance_owners([10, 1, 1, 8], 2) == [0, 1, 1, 1]
    assert balance_owners([5, 5, 5], 1) == [0, 0, 0]
    assert budget_groups([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]


def test_deepspeed_loss_scaler_round_trips_through_json():
    """DeepSpeed runs fp16 on GPUs only; its scaler objects, and the engine methods over them, work without one."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaleConfig, LossScaler

    def scaler() -> DynamicLossScaler:
        return DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                 consecutive_hysteresis=False)

    def engine(**optimizer) -> SimpleNamespace:
        return SimpleNamespace(engine=SimpleNamespace(optimizer=SimpleNamespace(**optimizer)))

    saved = scaler()
    saved.cur_scale, saved.cur_iter, saved.last_overflow_iter, saved.cur_hysteresis = 512.0, 37, 30, 1
    state = json.loads(json.dumps(ds_engine.DeepSpeedEngine.extra_state(engine(loss_scaler=saved))))
    assert state["loss_scale"] == 512.0
    fresh = scaler()
    ds_engine.DeepSpeedEngine.load_extra_state(engine(loss_scaler=fresh), state)
    assert (fresh.cur_scale, fresh.cur_iter, fresh.last_overflow_iter, fresh.cur_hysteresis) == (512.0, 37, 30, 1)

    # ZeRO-0's fp16 optimizers keep the counters in loss_scale_config; a scale saved by another engine carries over
    config = LossScaleConfig(torch.float16, True, 1.0, None)
    ds_engine.DeepSpeedEngine.load_extra_state(engine(loss_scale_config=config), {"loss_scale": 1024.0})
    assert config.cur_scale == 1024.0
    # bf16 / fp32: a static scaler of 1, nothing to save
    assert ds_engine.DeepSpeedEngine.extra_state(engine(loss_scaler=LossScaler(1.0))) == {}
