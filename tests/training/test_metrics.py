"""Metrics: the console line, metrics.jsonl (train and eval records), MFU, and wandb that stays off the network."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from pathlib import Path

import pytest

from .conftest import run_tiny, tiny_config
from megatron_lite.planning.flops import training_flops_per_token
from megatron_lite.training.metrics import format_train_line, resolve_wandb_mode

TRAIN_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gib", "data_wait"}


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def logged(tmp_path_factory, corpus):
    """6 steps, logging every 2 and evaluating every 3; returns (records, console text, result)."""
    lines: list[str] = []  # the trainer's console: metrics lines go through its log callback
    res = run_tiny(tmp_path_factory.mktemp("metrics") / "run", corpus, "training.train_steps=6",
                   "logging.log_interval=2", "training.eval_interval=3", log=lines)
    return read_records(res.run_dir), "\n".join(lines), res


def test_one_train_record_per_log_interval(logged) -> None:
    records, _, _ = logged
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert TRAIN_KEYS <= r.keys(), r.keys()
        assert math.isfinite(r["loss"]) and 5.0 < r["loss"] < 7.5  # about ln(512) for an untrained model
        assert r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["mfu"] is None  # CPU with no logging.peak_flops: no honest peak to divide by
        assert 0 < r["memory_gib"] < 64
        assert 0.0 <= r["data_wait"] <= 1.0
        assert r["consumed_samples"] == r["step"] * 8


def test_eval_records_hold_valid_loss_and_perplexity(logged) -> None:
    records, _, res = logged
    evals = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]  # before training, every 3 steps; none repeated at the end
    for r in evals:
        assert r["valid_ppl"] == pytest.approx(math.exp(r["valid_loss"]))
    assert [(r["step"], r["valid_loss"]) for r in evals] == res.valid_losses


def test_console_line_has_every_field(logged) -> None:
    _, console, _ = logged
    lines = [line for line in console.splitlines() if line.startswith("step ")]
    assert len(lines) == 3
    for field in ("step      2/6", "loss ", "lr ", "grad_norm ", "tok/s ", "mfu n/a", "mem ", " GiB", "data "):
        assert field in lines[0], (field, lines[0])
    evals = [line for line in console.splitlines() if line.startswith("eval step")]
    assert len(evals) == 3 and "valid loss" in evals[0] and "valid ppl" in evals[0]


def test_format_train_line_shows_mfu_as_a_percentage() -> None:
    record = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12345.6, "mfu": 0.4321,
              "memory_gib": 1.5, "data_wait": 0.02}
    line = format_train_line(record, 10)
    assert "mfu 43.2%" in line and "tok/s 12,346" in line and "data 2%" in line and "step      3/10" in line


def test_peak_flops_gives_mfu_from_the_planning_formula(tmp_path, corpus) -> None:
    res = run_tiny(tmp_path / "run", corpus, "training.train_steps=2", "logging.peak_flops=1e12")
    train = [r for r in read_records(res.run_dir) if "loss" in r]
    per_token = training_flops_per_token(tiny_config(tmp_path, corpus).model, 32)  # the formula tools/plan.py uses
    for r in train:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e12)
        assert 0 < r["mfu"] < 1


def test_wandb_auto_is_offline_without_an_api_key(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == "online"
    for mode in ("online", "offline", "disabled"):
        assert resolve_wandb_mode(mode) == mode


class ConnectionTrap:
    """A local TCP listener that counts connections; every proxy and the wandb server URL point at it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hits: list = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.hits.append(addr)
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["offline", "auto"])
def test_wandb_offline_writes_under_the_run_dir_and_makes_no_network_calls(tmp_path, corpus, monkeypatch, mode) -> None:
    trap = ConnectionTrap()
    try:
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(var, trap.url)
        monkeypatch.setenv("WANDB_BASE_URL", trap.url)
        for var in ("NO_PROXY", "no_proxy", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
            monkeypatch.delenv(var, raising=False)
        run_dir = tmp_path / "run"
        run_tiny(run_dir, corpus, "training.train_steps=2", f"logging.wandb_mode={mode}")
        offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1, list(run_dir.rglob("*"))
        assert list(offline_runs[0].glob("run-*.wandb")), list(offline_runs[0].iterdir())
        assert trap.hits == [], f"wandb connected {len(trap.hits)} times in {mode} mode"
        assert not os.environ.get("WANDB_API_KEY")
    finally:
        trap.close()
