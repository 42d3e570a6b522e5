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


# ----------------------------------------------------------------------------------------------------------------------
# Layers: each package imports only from the layers below it (docs/architecture.md has the same table)
# ----------------------------------------------------------------------------------------------------------------------

GROUND = {"errors", "constants", "config", "rules", "topology"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "constants": set(),
    "config": {"errors"},
    "rules": {"errors", "config"},
    "topology": {"errors", "config", "rules"},
    "data": GROUND,
    "models": GROUND,
    "parallel": GROUND,
    "step": GROUND | {"data", "models", "parallel"},
    "engines": GROUND | {"models", "parallel", "step"},
    "planning": GROUND | {"data", "models", "parallel", "step"},
    "convert": GROUND | {"data", "models", "step"},
    "families": GROUND | {"models", "parallel", "step", "engines", "convert"},
    "training": GROUND | {"data", "models", "parallel", "step", "engines", "planning", "convert", "families"},
    "parity": GROUND | {"data", "models", "parallel", "step", "engines", "planning", "convert", "families",
                        "training"},
    "dryrun": GROUND | {"data", "models", "parallel", "step", "engines", "planning", "convert", "families"},
    "bench": GROUND | {"data", "models", "parallel", "step", "engines", "planning", "convert", "families",
                       "training", "parity"},
}


def package_imports(root: Path = PACKAGE) -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: [files]}}, a package being a first-level module or folder of megatron_lite;
    imports inside functions and under TYPE_CHECKING count, relative ones too."""
    out: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        me = rel.parts[0].removesuffix(".py")
        if me == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = list(rel.parts[:-1])[: len(rel.parts) - node.level]
                    target = base[0] if base else (node.module or "").split(".")[0]
                    targets = [target] if base else []
                else:
                    targets = [node.module.split(".")[1] if node.module.startswith("megatron_lite.") else ""]
                    if node.module == "megatron_lite":  # from megatron_lite import rules
                        targets = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("megatron_lite.")]
            else:
                continue
            for target in targets:
                if target and target != me:
                    out.setdefault(me, {}).setdefault(target, []).append(str(rel))
    return out


def upward_imports(imports: dict[str, dict[str, list[str]]]) -> list[str]:
    """Every import of a package its layer may not import (and of a package missing from the table)."""
    bad = []
    for package, targets in sorted(imports.items()):
        if package not in ALLOWED:
            bad.append(f"{package} is not in the layer table")
            continue
        for target, files in sorted(targets.items()):
            if target not in ALLOWED[package]:
                bad.append(f"{package} imports {target} ({sorted(set(files))[0]})")
    return bad


def test_packages_import_only_downward():
    assert upward_imports(package_imports()) == []


def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    """A planted import of the trainer from the data package, inside a function, is found and named."""
    import shutil

    copy = tmp_path / "megatron_lite"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    loader = copy / "data" / "loader.py"
    loader.write_text(loader.read_text() + "\n\ndef _planted():\n    from megatron_lite.training.trainer import train\n")
    assert upward_imports(package_imports(copy)) == ["data imports training (data/loader.py)"]


def test_every_package_says_its_one_job():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.parent.name}/__init__.py has no docstring saying what the package is for"
