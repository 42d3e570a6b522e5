"""One document per sample, truncated and right-padded: for data where documents must not be packed together.

Sample ``i`` is document ``order_e[i mod D]`` of the split's ``D`` documents, in epoch ``e = i // D``; each epoch's
order is a permutation drawn from ``(seed, e)``, so a sample is a pure function of (data, split range, seq_len, seed,
i), as with packed samples. The document's first ``seq_len + 1`` tokens are kept and the rest of the sample is
padding: ``padding_mask`` is True on real tokens. The loader turns padded positions into ignored labels (-100) and
masks them out of attention, so a step's loss is weighted by the valid tokens it holds (``engines/base.py``).
"""

from __future__ import annotations

import numpy as np

from .errors import DataError
from .indexed import IndexedDataset

PAD_ID = 0  # the token id written into padded positions: never attended to, never a label


class PaddedDocumentDataset:
    """``ds[i]`` is a dict with ``tokens`` (int64, ``seq_len + 1``) and ``padding_mask`` (bool, ``seq_len + 1``)."""

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], seq_len: int, seed: int,
                 num_samples: int, name: str = "") -> None:
        d0, d1 = int(doc_range[0]), int(doc_range[1])
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len}: expected a positive sequence length")
        if not 0 <= d0 < d1 <= indexed.num_documents:
            raise DataError(f"{indexed.prefix}: document range {d0}..{d1} is outside 0..{indexed.num_documents}")
        self.indexed, self.doc_range = indexed, (d0, d1)
        self.seq_len, self.seed, self.num_samples = int(seq_len), int(seed), int(num_samples)
        self.name = name
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def document_of(self, i: int) -> int:
        """The document index of sample ``i``."""
        d0, d1 = self.doc_range
        epoch, pos = divmod(i, d1 - d0)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, 2, epoch]).permutation(d1 - d0) + d0)
        return int(self._epoch[1][pos])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range 0..{self.num_samples}")
        doc = self.indexed.document(self.document_of(i))[: self.seq_len + 1]
        tokens = np.full(self.seq_len + 1, PAD_ID, dtype=np.int64)
        tokens[: doc.size] = doc
        mask = np.zeros(self.seq_len + 1, dtype=bool)
        mask[: doc.size] = True
        return {"tokens": tokens, "padding_mask": mask}
