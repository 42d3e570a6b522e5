"""Data pipeline: tokenized ``.bin/.idx`` corpora, packed causal-LM samples, blends, and the global-batch loader.

The trainer needs only :func:`build_datasets` and :class:`GlobalBatchLoader`; preprocessing tools use the rest.
Every name is imported from its module when first asked for, so that a tool importing one light module (errors,
the reference encoder) starts without numpy, the config or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOMES = {
    "BlendedDataset": "blend",
    "parse_blend": "blend",
    "build_datasets": "datasets",
    "DataError": "errors",
    "GPTDataset": "gpt_dataset",
    "DType": "indexed",
    "IndexedDataset": "indexed",
    "IndexedDatasetWriter": "indexed",
    "merge_shards": "indexed",
    "GlobalBatchLoader": "loader",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = ["BlendedDataset", "DType", "DataError", "GPTDataset", "GlobalBatchLoader", "IndexedDataset",
           "IndexedDatasetWriter", "Tokenizer", "build_datasets", "load_tokenizer", "merge_shards", "parse_blend"]

if TYPE_CHECKING:
    from .blend import BlendedDataset, parse_blend
    from .datasets import build_datasets
    from .errors import DataError
    from .gpt_dataset import GPTDataset
    from .indexed import DType, IndexedDataset, IndexedDatasetWriter, merge_shards
    from .loader import GlobalBatchLoader
    from .tokenizer import Tokenizer, load_tokenizer


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
