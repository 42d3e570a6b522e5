"""House rules that keep the design's properties, checked on the source itself."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_lite"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_know_nothing_about_parallelism(path):
    forbidden = ("megatron_lite.engines", "megatron_lite.parallel", "torch.distributed", "deepspeed")
    bad = sorted(name for name in _imports(path) if name.startswith(forbidden))
    assert not bad, f"{path.name} imports {bad}"


def test_every_engine_runs_the_shared_step():
    from megatron_lite.engines import _ENGINES
    from megatron_lite.engines.base import Engine

    for spec in _ENGINES.values():
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Engine)
        assert cls.train_step is Engine.train_step and cls.eval_loss is Engine.eval_loss, name


@pytest.mark.parametrize(
    "path", sorted(p for p in (PACKAGE / "engines").glob("*.py") if p.name != "base.py"), ids=lambda p: p.name
)
def test_no_engine_has_its_own_accumulation_loop(path):
    """Only ``engines/base.py`` iterates over a step's microbatches."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.For, ast.comprehension)):
            loop = ast.unparse(node.iter)
            assert "microbatch" not in loop, f"{path.name}: loop over {loop}"
