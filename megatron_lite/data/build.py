"""Turn a data config into the train/valid/test datasets the trainer reads."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .blend import BlendedDataset, blend_indices, normalize, parse_blend
from .errors import DataError
from .gpt_dataset import GPTDataset
from .indexed import IndexedDataset
from .padded_dataset import PaddedDocumentDataset
from .splits import split_ranges


def build_causal_lm_datasets(cfg, num_samples: dict[str, int], log: Callable[[str], None] = print) -> dict:
    """``{"train": ds, "valid": ds, "test": ds}`` for the parts of ``cfg.split`` with positive weight.

    ``cfg`` needs ``prefixes, split, seq_len, seed, reset_at_document, cache_dir, packing``. ``num_samples[name]`` is
    how many samples each part must supply (a missing or zero entry builds that part with one epoch's worth). Each part
    of each prefix is a :class:`GPTDataset` (packed) or a :class:`PaddedDocumentDataset` (``packing: padded``); with
    several prefixes they are blended by weight and the per-prefix sample counts are logged.
    """
    blend = parse_blend(cfg.prefixes)
    weights = normalize([w for w, _ in blend])
    readers = [IndexedDataset(p) for _, p in blend]
    ranges = [split_ranges(cfg.split, r.num_documents, r.prefix) for r in readers]
    out: dict = {}
    for name in ranges[0]:
        wanted = int(num_samples.get(name) or 0)
        seed = cfg.seed + {"train": 0, "valid": 1, "test": 2}[name]
        padded = cfg.packing == "padded"
        kw = dict(seq_len=cfg.seq_len, seed=seed)
        if not padded:
            kw.update(reset_at_document=cfg.reset_at_document, cache_dir=cfg.cache_dir)
        make = PaddedDocumentDataset if padded else GPTDataset
        epoch = _documents if padded else _one_epoch
        if len(readers) == 1:
            n = wanted or epoch(readers[0], ranges[0][name], cfg.seq_len)
            extra = {} if padded else {"log": log}
            out[name] = make(readers[0], ranges[0][name], num_samples=n, name=name, **extra, **kw)
            continue
        n = wanted or min(epoch(r, rg[name], cfg.seq_len) for r, rg in zip(readers, ranges))
        ds_index, ds_sample, counts = blend_indices(weights, n, cfg.cache_dir, log)
        parts = []
        for (w, prefix), reader, rg, c in zip(blend, readers, ranges, counts):
            parts.append(make(reader, rg[name], num_samples=max(1, int(c)), name=f"{name}:{prefix}", **kw))
        log(f"{name}: blend of {n:,} samples: " + ", ".join(
            f"{p} {int(c):,} ({c / n:.1%}, weight {w:.3f})" for (_, p), c, w in zip(blend, counts, weights)))
        out[name] = BlendedDataset(parts, ds_index, ds_sample, name=name)
    return out


def _documents(reader: IndexedDataset, doc_range: tuple[int, int], seq_len: int) -> int:
    """Samples in one epoch of padded documents: one per document."""
    return doc_range[1] - doc_range[0]


def _one_epoch(reader: IndexedDataset, doc_range: tuple[int, int], seq_len: int) -> int:
    b = reader.document_indices
    tokens = int(reader.sequence_lengths[b[doc_range[0]]:b[doc_range[1]]].sum(dtype=np.int64))
    if tokens < seq_len + 1:
        raise DataError(f"{reader.prefix}: documents {doc_range[0]}..{doc_range[1]} hold {tokens} tokens, fewer than "
                        f"one sample of seq_len + 1 = {seq_len + 1}")
    return max(1, (tokens - 1) // seq_len)
