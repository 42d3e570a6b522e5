"""A tiny tokenized corpus and helpers that run the real trainer on the tiny model in a few seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_lite.config import Config, load_config
from megatron_lite.data import IndexedDatasetWriter
from megatron_lite.training.trainer import TrainResult, train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
VOCAB = 512  # the tiny model's vocabulary


def write_corpus(prefix: Path, n_docs: int = 300, seed: int = 0) -> None:
    """Random documents of 8..80 tokens: enough for a few hundred seq_len-32 samples per split."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for _ in range(n_docs):
            w.add_document(rng.integers(0, VOCAB, int(rng.integers(8, 80))))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prefix of a shared read-only corpus (the sample-index cache sits beside it)."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "docs")
    return root / "docs"


def tiny_config(run_dir: Path, corpus: Path, *overrides: str) -> Config:
    """configs/tiny.yaml pointed at ``corpus`` and ``run_dir``, with wandb off unless an override turns it on."""
    base = [
        f"data.prefixes={corpus}",
        f"data.cache_dir={corpus.parent / 'cache'}",
        f"logging.run_dir={run_dir}",
        "logging.wandb_mode=disabled",
    ]
    return load_config(TINY, base + list(overrides))


def run_tiny(run_dir: Path, corpus: Path, *overrides: str, log: list[str] | None = None) -> TrainResult:
    """Train the tiny model through the public ``train`` entry point; log lines go to ``log`` (or nowhere)."""
    sink = log.append if log is not None else (lambda _: None)
    return train(tiny_config(run_dir, corpus, *overrides), log=sink)


@pytest.fixture
def make_run(tmp_path: Path, corpus: Path):
    """``make_run(name, *overrides)`` trains in ``tmp_path/name`` and returns the TrainResult."""

    def _run(name: str, *overrides: str, log: list[str] | None = None) -> TrainResult:
        return run_tiny(tmp_path / name, corpus, *overrides, log=log)

    return _run


def checkpoint_tensors(ckpt: Path) -> dict:
    """Every logical tensor of a checkpoint directory, read from its safetensors files (no pickle)."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no tensors under {ckpt}"
    return out


def model_tensors(ckpt: Path) -> dict:
    return {k: v for k, v in checkpoint_tensors(ckpt).items() if k.startswith("model.")}


@pytest.fixture(scope="session")
def one_document(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two copies of one 48-token document of distinct ids: a corpus a model can memorize."""
    root = tmp_path_factory.mktemp("one_document")
    doc = np.random.default_rng(7).permutation(VOCAB)[:48]
    with IndexedDatasetWriter(str(root / "doc"), np.uint16) as w:
        w.add_document(doc)
        w.add_document(doc)
    return root / "doc"
