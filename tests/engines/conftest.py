"""A tiny tokenized corpus and a tiny config for the engine tests: a ~1M-parameter model, seq 32, global batch 8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import IndexedDatasetWriter

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """200 documents of 20-120 token ids with a learnable pattern (arithmetic runs), as a ``.bin/.idx`` prefix."""
    prefix = tmp_path_factory.mktemp("corpus") / "tiny"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, dtype=np.uint16, vocab_size=VOCAB) as writer:
        for _ in range(200):
            n, start, stride = int(rng.integers(20, 120)), int(rng.integers(0, VOCAB)), int(rng.integers(1, 4))
            writer.add_document((start + np.arange(n) * stride) % VOCAB)
    return str(prefix)


@pytest.fixture(scope="session")
def vocab500_config(tmp_path_factory) -> str:
    """The tiny model with 500 real tokens padded to 512 columns (``model.vocab_size=500``), on a corpus of ids below
    500: the vocabulary's padding sits on the last tensor-parallel rank."""
    root = tmp_path_factory.mktemp("vocab500")
    prefix = root / "tiny500"
    rng = np.random.default_rng(2)
    with IndexedDatasetWriter(prefix, dtype=np.uint16, vocab_size=500) as writer:
        for _ in range(200):
            n, start, stride = int(rng.integers(20, 120)), int(rng.integers(0, 500)), int(rng.integers(1, 4))
            writer.add_document((start + np.arange(n) * stride) % 500)
    path = root / "tiny500.yaml"
    path.write_text(
        f"base: {REPO / 'configs' / 'tiny.yaml'}\n"
        f"model:\n  vocab_size: 500\ndata:\n  prefixes: {prefix}\n  cache_dir: {root / 'index-cache'}\n"
        "training:\n  eval_interval: 0\nlogging:\n  wandb_mode: disabled\n"
    )
    return str(path)


def _on_corpus(base: str, corpus: str, root: Path) -> str:
    """``configs/<base>`` pointed at the corpus, with a cosine schedule long enough that resumed runs share it."""
    path = root / base
    path.write_text(
        f"base: {REPO / 'configs' / base}\n"
        "data:\n"
        f"  prefixes: {corpus}\n"
        f"  cache_dir: {root / 'index-cache'}\n"
        "training:\n"
        "  train_steps: 4\n"
        "  eval_interval: 0\n"
        "schedule:\n"
        "  warmup_steps: 1\n"
        "  decay_steps: 8\n"
        "logging:\n"
        "  log_interval: 1\n"
        "  wandb_mode: disabled\n"
    )
    return str(path)


@pytest.fixture(scope="session")
def tiny_config(corpus, tmp_path_factory) -> str:
    """configs/tiny.yaml on the corpus."""
    return _on_corpus("tiny.yaml", corpus, tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="session")
def tiny_moe_config(corpus, tmp_path_factory) -> str:
    """configs/tiny-moe.yaml (4 experts, top 2, every layer) on the corpus."""
    return _on_corpus("tiny-moe.yaml", corpus, tmp_path_factory.mktemp("moe-config"))


@pytest.fixture(scope="session")
def padded_config(tmp_path_factory) -> str:
    """The tiny model on 200 documents of 3-40 tokens (samples of 33), global batch 16 in microbatches of 2."""
    root = tmp_path_factory.mktemp("padded")
    prefix = root / "uneven"
    rng = np.random.default_rng(1)
    with IndexedDatasetWriter(prefix, dtype=np.uint16, vocab_size=VOCAB) as writer:
        for _ in range(200):
            n, start, stride = int(rng.integers(3, 41)), int(rng.integers(0, VOCAB)), int(rng.integers(1, 4))
            writer.add_document((start + np.arange(n) * stride) % VOCAB)
    path = root / "padded.yaml"
    path.write_text(
        f"base: {REPO / 'configs' / 'tiny.yaml'}\n"
        "data:\n"
        f"  prefixes: {prefix}\n"
        f"  cache_dir: {root / 'index-cache'}\n"
        "  packing: padded\n"
        "training:\n"
        "  global_batch_size: 16\n"
        "  micro_batch_size: 2\n"
        "  eval_interval: 0\n"
        "logging:\n"
        "  wandb_mode: disabled\n"
    )
    return str(path)


@pytest.fixture(scope="session")
def saved_runs(tiny_config, tmp_path_factory):
    """Runs of the tiny config that save a checkpoint at step ``save_at``, computed once per (layout, overrides,
    save_at): ``get(layout, overrides, save_at) -> (per-step losses, the checkpoint of step save_at)``."""
    from megatron_lite.parity import run_layout

    cache: dict[tuple, tuple[list[float], Path]] = {}

    def get(layout: str, overrides: tuple[str, ...] = (), save_at: int = 2) -> tuple[list[float], Path]:
        key = (layout, tuple(overrides), save_at)
        if key not in cache:
            ckpt = tmp_path_factory.mktemp(f"ckpt-{layout}")
            run = run_layout(layout, tiny_config, [*overrides, f"checkpoint.interval={save_at}"], timeout=300,
                             checkpoint_dir=ckpt)
            cache[key] = (run.losses, ckpt / f"step_{save_at:08d}")
        return cache[key]

    return get


def engine_and_batches(config: str, overrides: list[str], steps: int):
    """This rank's engine for ``config`` (run inside forked ranks) and an iterator over ``steps`` global batches, for
    tests that look inside the engine between steps."""
    from megatron_lite.config import load_config
    from megatron_lite.data import GlobalBatchLoader, build_datasets
    from megatron_lite.engines import build_engine
    from megatron_lite.families import get_family
    from megatron_lite.topology import Topology

    cfg = load_config(config, overrides)
    topology = Topology.from_env(cfg.parallel, "cpu")
    family = get_family(cfg.model.family)
    engine = build_engine(cfg, family.factory(cfg, topology), topology, family.task(cfg, topology))
    data = build_datasets(cfg.data, {"train": steps * cfg.global_batch_size}, log=lambda *_: None)["train"]
    batches = iter(GlobalBatchLoader(data, cfg.global_batch_size, cfg.training.micro_batch_size, topology.dp_rank,
                                     topology.dp, 0, prefetch=0))
    return engine, batches


def assert_layouts_match(report, steps: int | None = None, tolerance: float = 1e-5) -> None:
    """Every layout of a parity report ran (all ``steps``) and matches the reference: losses, every gradient piece,
    what each rank built."""
    assert not report.errors, report.errors
    if steps is not None:
        assert all(len(v) == steps for v in report.losses.values())
    assert report.failures(tolerance) == [], report.table()


def assert_refused_in_one_line(config: str, overrides: list[str], world: int, message: str) -> None:
    """The rules refuse ``config`` with ``overrides`` on ``world`` CPU ranks in one line containing ``message``."""
    from megatron_lite.config import ConfigError, load_config
    from megatron_lite.rules import check_layout

    cfg = load_config(config, overrides)
    with pytest.raises(ConfigError) as info:
        check_layout(cfg, world, "cpu")
    assert message in str(info.value) and "\n" not in str(info.value)
