"""The datasets a config's objective trains on: packed or padded samples of a corpus for a decoder
(``build.py``), span-corrupted windows or aligned pairs for an encoder-decoder (``seq2seq.py``)."""

from __future__ import annotations

from typing import Callable

from .build import build_causal_lm_datasets
from .seq2seq import build_encdec_datasets


def build_datasets(cfg, num_samples: dict[str, int], log: Callable[[str], None] = print) -> dict:
    """``{"train": ds, "valid": ds, "test": ds}`` for the parts of ``cfg.split`` with positive weight, as
    ``cfg.objective`` says (a missing objective is the decoder's)."""
    if getattr(cfg, "objective", "causal_lm") != "causal_lm":
        return build_encdec_datasets(cfg, num_samples, log)
    return build_causal_lm_datasets(cfg, num_samples, log)
