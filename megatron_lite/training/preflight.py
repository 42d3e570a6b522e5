"""Checks run once before a model is built: are the data files readable, and do the data fit the model?

A token id at or above ``model.vocab_size`` is not caught by the embedding on every device (an out-of-range index
on a GPU is an asynchronous device assert, hours in), so the tokenizer named by ``data.tokenizer`` is read at start
and its largest id is compared with the embedding. A missing or unreadable tokenizer fails here too, in one line.
"""

from __future__ import annotations

from megatron_lite.config import Config
from megatron_lite.data import DataError


def check_data_files(cfg: Config) -> None:
    """Open every shard of ``data.prefixes`` (header, sizes) and split its documents: a missing, corrupt, truncated
    or empty shard fails in a fraction of a second, before torch loads. The trainer opens them again."""
    from megatron_lite.data import IndexedDataset, parse_blend
    from megatron_lite.data.splits import split_ranges

    if not cfg.data.prefixes:  # the trainer says so, after the layout checks that need no data
        return

    for _, prefix in parse_blend(cfg.data.prefixes):
        reader = IndexedDataset(prefix)
        split_ranges(cfg.data.split, reader.num_documents, reader.prefix)


def check_data_fits_model(cfg: Config) -> None:
    """Raise a one-line :class:`DataError` when ``data.tokenizer`` is unusable or has ids the model cannot embed."""
    if not cfg.data.tokenizer:
        return
    from megatron_lite.data import Tokenizer

    tok = Tokenizer(cfg.data.tokenizer)
    needed = tok.max_id + 1
    if needed > cfg.model.vocab_size:
        raise DataError(
            f"data.tokenizer={cfg.data.tokenizer} has token ids up to {tok.max_id} ({tok.max_token!r}), but "
            f"model.vocab_size={cfg.model.vocab_size}: set model.vocab_size to at least {needed}"
        )
