"""Data pipeline: tokenized ``.bin/.idx`` corpora, packed causal-LM samples, blends, and the global-batch loader.

The trainer needs only :func:`build_datasets` and :class:`GlobalBatchLoader`; preprocessing tools use the rest.
"""

from .blend import BlendedDataset, parse_blend
from .datasets import build_datasets
from .errors import DataError
from .gpt_dataset import GPTDataset
from .indexed import DType, IndexedDataset, IndexedDatasetWriter, merge_shards
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BlendedDataset",
    "DType",
    "DataError",
    "GPTDataset",
    "GlobalBatchLoader",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "Tokenizer",
    "build_datasets",
    "load_tokenizer",
    "merge_shards",
    "parse_blend",
]


def __getattr__(name: str):
    # The loader needs torch; import it only when asked so preprocessing workers start fast.
    if name == "GlobalBatchLoader":
        from .loader import GlobalBatchLoader

        return GlobalBatchLoader
    raise AttributeError(name)
