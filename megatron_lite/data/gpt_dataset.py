"""Packed causal-LM samples over a document range of an :class:`IndexedDataset`.

Three index arrays (see ``docs/formats.md`` for a worked example):

* **document index** (``doc_index``): the sequences of the split in stream order. Epoch ``e`` is a permutation of the
  split's documents drawn from ``(seed, e)``; each document contributes its sequences in file order.
* **sample index** (``sample_index[j] = (k, offset)``): unshuffled sample ``j`` starts ``offset`` tokens into entry
  ``k`` of the document index, i.e. at stream token ``j * seq_len``. It reads ``seq_len + 1`` tokens, so consecutive
  samples share one token (the last label of one is the first input of the next) and every token of an epoch is an
  input exactly once.
* **shuffle index**: global sample ``i`` is unshuffled sample ``shuffle_index[i]``. Samples are shuffled inside blocks of
  ``B = tokens_per_epoch // seq_len`` samples, block ``b`` by a permutation drawn from ``(seed, b)``.

Every permutation depends on the seed and its own epoch or block number only, so sample ``i`` is a pure function of
(data, split range, seq_len, seed, i): asking for more samples extends the stream without reordering its start.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from .cache import cached_arrays
from .errors import DataError
from .indexed import IndexedDataset

INDEX_VERSION = 1


def _expand_documents(doc_bounds: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Sequence indices of ``docs`` (in that order), each document's sequences consecutive: vectorized ragged arange."""
    starts = doc_bounds[docs]
    counts = doc_bounds[docs + 1] - starts
    total = int(counts.sum())
    if total == docs.size:  # one sequence per document, the common case
        return starts.astype(np.int64)
    run_start = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + (np.arange(total, dtype=np.int64) - run_start)


def build_indices(lengths: np.ndarray, doc_bounds: np.ndarray, doc_range: tuple[int, int], seq_len: int, seed: int,
                  num_samples: int) -> dict[str, np.ndarray]:
    """The document, sample and shuffle indices for ``num_samples`` samples (rounded up to whole shuffle blocks)."""
    d0, d1 = doc_range
    docs = np.arange(d0, d1, dtype=np.int64)
    units = _expand_documents(doc_bounds, docs)
    tokens_per_epoch = int(lengths[units].sum(dtype=np.int64))
    block = max(1, tokens_per_epoch // seq_len)
    n_blocks = -(-num_samples // block)
    n_built = n_blocks * block
    epochs = -(-(n_built * seq_len + 1) // tokens_per_epoch)
    order = [_expand_documents(doc_bounds, np.random.default_rng([seed, 0, e]).permutation(docs))
             for e in range(epochs)]
    doc_index = np.concatenate(order)
    doc_index = doc_index.astype(np.int32 if doc_index.size and doc_index.max() < 2**31 else np.int64)
    cum = np.zeros(doc_index.size + 1, dtype=np.int64)
    np.cumsum(lengths[doc_index], out=cum[1:])
    starts = np.arange(n_built + 1, dtype=np.int64) * seq_len
    k = np.searchsorted(cum, starts, side="right") - 1
    sample_index = np.stack([k, starts - cum[k]], axis=1)
    shuffle_index = np.concatenate([np.random.default_rng([seed, 1, b]).permutation(block) + b * block
                                    for b in range(n_blocks)]).astype(np.int64)
    return {"doc_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index,
            "epochs": np.array([epochs, tokens_per_epoch], dtype=np.int64)}


class GPTDataset:
    """``ds[i]`` is a dict with ``tokens`` (int64, ``seq_len + 1``) and, when ``reset_at_document``, ``position_ids``
    and ``document_ids`` (int64, ``seq_len``) that restart at every document start inside the sample's inputs."""

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], seq_len: int, seed: int, num_samples: int,
                 reset_at_document: bool = False, cache_dir: str | os.PathLike | None = None, name: str = "",
                 log: Callable[[str], None] | None = None) -> None:
        self.indexed = indexed
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        self.seq_len, self.seed, self.num_samples = int(seq_len), int(seed), int(num_samples)
        self.reset_at_document = reset_at_document
        self.name = name or os.path.basename(indexed.prefix)
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len}: expected a positive sequence length")
        d0, d1 = self.doc_range
        if not 0 <= d0 < d1 <= indexed.num_documents:
            raise DataError(f"{indexed.prefix}: document range {d0}..{d1} is outside 0..{indexed.num_documents}")
        bounds = indexed.document_indices
        tokens = int(indexed.sequence_lengths[bounds[d0]:bounds[d1]].sum(dtype=np.int64))
        if tokens < seq_len + 1:
            raise DataError(f"{indexed.prefix}: {self.name} has {tokens} tokens in documents {d0}..{d1}, fewer than "
                            f"one sample of seq_len + 1 = {seq_len + 1}")
        key = {"version": INDEX_VERSION, "files": indexed.identity(), "doc_range": list(self.doc_range),
               "seq_len": self.seq_len, "seed": self.seed, "num_samples": self.num_samples}
        idx = cached_arrays(cache_dir, f"gpt-{os.path.basename(indexed.prefix)}", key,
                            lambda: build_indices(indexed.sequence_lengths, np.asarray(bounds), self.doc_range,
                                                  self.seq_len, self.seed, self.num_samples), log)
        self.doc_index, self.sample_index, self.shuffle_index = idx["doc_index"], idx["sample_index"], idx["shuffle_index"]
        self.epochs, self.tokens_per_epoch = (int(x) for x in idx["epochs"])
        self._lengths = indexed.sequence_lengths
        self._starts_doc: np.ndarray | None = None
        if reset_at_document:
            self._starts_doc = np.zeros(len(indexed) + 1, dtype=bool)
            self._starts_doc[np.asarray(bounds[:-1])] = True
        if log:
            log(f"{self.name}: documents {d0}..{d1}, {self.tokens_per_epoch:,} tokens per epoch, {self.num_samples:,} "
                f"samples of {self.seq_len + 1} tokens over {self.epochs} epoch(s)")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range 0..{self.num_samples}")
        return self.unshuffled(int(self.shuffle_index[i]))

    def unshuffled(self, j: int) -> dict[str, np.ndarray]:
        """Unshuffled sample ``j``: stream tokens ``[j * seq_len, j * seq_len + seq_len + 1)``."""
        k, off = (int(x) for x in self.sample_index[j])
        need = self.seq_len + 1
        pieces, doc_starts, pos = [], [], 0
        while need > 0:
            u = int(self.doc_index[k])
            take = min(int(self._lengths[u]) - off, need)
            if self._starts_doc is not None and off == 0 and pos > 0 and self._starts_doc[u]:
                doc_starts.append(pos)
            pieces.append(self.indexed.get(u, off, take))
            pos += take
            need -= take
            k += 1
            off = 0
        tokens = np.concatenate(pieces).astype(np.int64) if len(pieces) > 1 else pieces[0].astype(np.int64)
        out = {"tokens": tokens}
        if self._starts_doc is not None:
            out.update(document_features(self.seq_len, doc_starts))
        return out


def document_features(seq_len: int, doc_starts: list[int]) -> dict[str, np.ndarray]:
    """``position_ids`` restarting at 0 and ``document_ids`` counting up at each start (positions within the inputs)."""
    marks = np.zeros(seq_len, dtype=np.int64)
    starts = [s for s in doc_starts if s < seq_len]
    marks[starts] = 1
    document_ids = np.cumsum(marks)
    first = np.zeros(seq_len, dtype=np.int64)
    first[starts] = starts
    position_ids = np.arange(seq_len, dtype=np.int64) - np.maximum.accumulate(first)
    return {"position_ids": position_ids, "document_ids": document_ids}
