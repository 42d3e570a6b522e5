"""The tools/loss_compare.py command line: its table, and exit codes 0 (all within tolerance), 1 (a layout failed or
differs) and 2 (bad arguments)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loss_compare():
    spec = importlib.util.spec_from_file_location("loss_compare", REPO / "tools" / "loss_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_passing_layout_exits_0_with_the_table(loss_compare, tiny_config, capsys):
    code = loss_compare.main(["--config", tiny_config, "--layouts", "ddp2", "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    header = next(line for line in out.splitlines() if line.startswith("step"))
    assert header.split()[1:] == ["single", "ddp2"]
    assert any(line.split()[:1] == ["1"] for line in out.splitlines())  # one row of losses per step
    assert "OK: 2 layouts within 1e-05 of single over 1 steps" in out


def test_layout_that_cannot_run_exits_1(loss_compare, tiny_config, capsys):
    """zero3-tp2 parses, but the engines refuse it: the harness reports the reason and exits 1."""
    code = loss_compare.main(["--config", tiny_config, "--layouts", "zero3-tp2", "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAILED" in out and "FAIL: zero3-tp2" in out
    assert "parallel.zero_stage=3 with parallel.tp=2 is not supported" in out


def test_bad_layout_name_exits_2(loss_compare, capsys):
    code = loss_compare.main(["--config", "unused.yaml", "--layouts", "single,ddp"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: layout 'ddp': unknown part 'ddp'")
