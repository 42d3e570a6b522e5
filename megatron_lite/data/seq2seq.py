"""Encoder-decoder data: aligned source/target shards (seq2seq pairs) and T5 span corruption, both read from
``.bin/.idx`` shards and both samples that are pure functions of (data, seed, global index).

**Pairs.** ``preprocess_data.py --json-key src --target-key tgt --output-prefix P`` writes the sources to ``P.bin/.idx``
and the targets to ``P_target.bin/.idx``, document ``k`` of one being the pair of document ``k`` of the other. A
sample is one pair: the source truncated to ``data.seq_len`` tokens and right-padded (``padding_mask`` True on real
tokens), the target truncated to ``data.target_seq_len`` and right-padded with ignored labels (-100), so that the loss
counts real target tokens only. Both sides are read through :class:`PaddedDocumentDataset` (and blended as the
causal-LM data is) with the same seed, split and sample counts, so both draw the same document for every index.

**Span corruption** (``span_corruption.py``) cuts windows from the packed causal-LM stream and corrupts each.

A sample is a dict of ``input_ids`` and ``labels`` (and ``padding_mask`` for pairs); the task builds the decoder
input from the labels (teacher forcing, ``step/tasks.py``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from megatron_lite.constants import IGNORE_INDEX

from .blend import parse_blend
from .build import build_causal_lm_datasets
from .errors import DataError
from .indexed import IndexedDataset
from .span_corruption import SpanCorruptionDataset, raw_length_for

TARGET_SUFFIX = "_target"


def target_prefix(prefix: str) -> str:
    """Where the targets aligned with the sources at ``prefix`` live."""
    return f"{prefix}{TARGET_SUFFIX}"


class Seq2SeqPairs:
    """``ds[i]``: ``input_ids`` and ``padding_mask`` (source, ``seq_len``) and ``labels`` (target, -100 on padding).

    ``sources`` and ``targets`` are padded-document datasets (or blends of them) built alike over aligned shards;
    their ``tokens`` hold ``seq_len`` and ``target_seq_len`` tokens.
    """

    def __init__(self, sources, targets, name: str = "") -> None:
        if len(sources) != len(targets):
            raise DataError(f"{name}: {len(sources)} source samples but {len(targets)} target samples")
        self.sources, self.targets, self.name = sources, targets, name

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        src, tgt = self.sources[i], self.targets[i]
        labels = np.where(tgt["padding_mask"], tgt["tokens"], IGNORE_INDEX).astype(np.int64)
        return {"input_ids": src["tokens"], "padding_mask": src["padding_mask"], "labels": labels}


def check_aligned(prefix: str) -> None:
    """Sources and targets at ``prefix`` hold the same number of documents (a DataError naming both otherwise)."""
    tgt = target_prefix(prefix)
    if not os.path.exists(f"{tgt}.idx"):
        raise DataError(f"{tgt}.idx not found: data.objective=seq2seq reads the targets of {prefix} from "
                        f"{tgt}.bin/.idx (preprocess_data.py --json-key SRC --target-key TGT writes both)")
    n_src, n_tgt = IndexedDataset(prefix).num_documents, IndexedDataset(tgt).num_documents
    if n_src != n_tgt:
        raise DataError(f"{prefix}: {n_src} source documents but {tgt} holds {n_tgt} targets; expected aligned shards")


def preprocess_pairs(inputs: list[str] | None, tokenizer: str, output_prefix: str, json_key: str, target_key: str,
                     skip_bad_records: bool = False, log: Callable[[str], None] = print, **kw):
    """Write aligned ``output_prefix`` (values of ``json_key``) and ``output_prefix_target`` (values of
    ``target_key``) shards from the same records; the corpus is read once per side. Returns both summaries."""
    from .preprocess import preprocess

    if skip_bad_records:
        raise DataError("--skip-bad-records cannot be combined with --target-key: a record skipped on one side only "
                        "would shift every later pair")
    src = preprocess(inputs, tokenizer, output_prefix, json_key=json_key, log=log, **kw)
    tgt = preprocess(inputs, tokenizer, target_prefix(output_prefix), json_key=target_key, log=log, **kw)
    if src.documents != tgt.documents:
        raise DataError(f"{output_prefix}: {src.documents} sources ('{json_key}') but {tgt.documents} targets "
                        f"('{target_key}'); expected one of each per record")
    return src, tgt


def build_encdec_datasets(cfg, num_samples: dict[str, int], log: Callable[[str], None] = print) -> dict:
    """``{"train": ds, ...}`` for ``cfg.objective`` ``span_corruption`` or ``seq2seq`` (see the module docstring)."""
    plain = dataclasses.replace(cfg, objective="causal_lm")
    if cfg.objective == "span_corruption":
        from .tokenizer import load_tokenizer

        if not cfg.tokenizer:
            raise DataError("data.objective=span_corruption takes its sentinels from data.tokenizer, which is not set")
        tok = load_tokenizer(cfg.tokenizer)
        raw = raw_length_for(cfg.seq_len, cfg.noise_density, cfg.mean_noise_span_length)
        windows = build_causal_lm_datasets(dataclasses.replace(plain, packing="packed", seq_len=raw - 1), num_samples,
                                           log)
        out = {}
        for name, ds in windows.items():
            seed = cfg.seed + {"train": 0, "valid": 1, "test": 2}[name]
            out[name] = SpanCorruptionDataset(ds, cfg.seq_len, tok.sentinel_ids, tok.eod_id, seed,
                                              cfg.noise_density, cfg.mean_noise_span_length, name=name)
        first = out[next(iter(out))]
        log(f"span corruption: windows of {first.raw_length} tokens -> inputs of {first.inputs_length}, targets of "
            f"{first.targets_length} (noise density {cfg.noise_density}, mean span {cfg.mean_noise_span_length})")
        return out
    if cfg.objective != "seq2seq":
        raise DataError(f"data.objective={cfg.objective!r}: expected span_corruption or seq2seq")
    blend = parse_blend(cfg.prefixes)
    for _, prefix in blend:
        check_aligned(prefix)
    target_prefixes = [x for w, p in blend for x in (w, target_prefix(p))]
    target_len = cfg.target_seq_len or cfg.seq_len
    # one document per sample on both sides, so each index draws the same pair; seq_len + 1 tokens are kept
    sources = build_causal_lm_datasets(dataclasses.replace(plain, packing="padded", seq_len=cfg.seq_len - 1),
                                       num_samples, log)
    targets = build_causal_lm_datasets(dataclasses.replace(plain, packing="padded", seq_len=target_len - 1,
                                                     prefixes=target_prefixes), num_samples, lambda _: None)
    return {name: Seq2SeqPairs(sources[name], targets[name], name) for name in sources}
