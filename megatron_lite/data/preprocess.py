"""Tokenize a corpus into a ``.bin/.idx`` pair: parallel across processes, streaming, in input order.

The main process reads documents and cuts them into chunks; worker processes tokenize chunks; the main process writes
results in submission order. At most ``2 * workers + 1`` chunks are in flight, so memory stays bounded whatever the
corpus size, and the output bytes do not depend on ``workers``.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import DataError
from .indexed import DType, IndexedDatasetWriter, check_can_write
from .sources import SourceStats, expand_inputs, iter_documents
from .tokenizer import Tokenizer, load_tokenizer

CHUNK_CHARS = 1 << 20  # about 1 MB of text per task: big enough to amortize IPC, small enough to bound memory
CHUNK_DOCS = 2048


@dataclass
class PreprocessSummary:
    documents: int
    tokens: int
    skipped: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def line(self, prefix: str) -> str:
        s = (f"wrote {prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens, {self.seconds:.1f} s, "
             f"{self.tokens_per_second:,.0f} tokens/s")
        return s + (f", {self.skipped:,} bad records skipped" if self.skipped else "")


_WORKER: dict = {}


def _init_worker(tokenizer_path: str, append_eod: bool, dtype: str) -> None:
    # One process per core already; keep each tokenizer single-threaded so processes do not fight over cores.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = load_tokenizer(tokenizer_path)
    _WORKER["eod"] = append_eod
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_chunk(texts: list[str], tok: Tokenizer | None = None, append_eod: bool | None = None,
                  dtype: np.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of all texts concatenated (with EOD after each when asked) and the per-document lengths."""
    tok = tok or _WORKER["tok"]
    append_eod = _WORKER["eod"] if append_eod is None else append_eod
    dtype = _WORKER["dtype"] if dtype is None else dtype
    ids = tok.encode_batch(texts)
    if append_eod:
        for x in ids:
            x.append(tok.eod_id)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _chunks(docs: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    buf: list[str] = []
    chars = 0
    for d in docs:
        buf.append(d)
        chars += len(d)
        if chars >= CHUNK_CHARS or len(buf) >= CHUNK_DOCS:
            yield buf, chars
            buf, chars = [], 0
    if buf:
        yield buf, chars


def _progress(total_chars: int | None, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_chars, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def preprocess(inputs: list[str] | None, tokenizer: str, output_prefix: str, workers: int = 1,
               append_eod: bool = False, overwrite: bool = False, skip_bad_records: bool = False,
               json_key: str = "text", text_mode: str = "block", dataset: str | None = None, split: str = "train",
               progress: bool = True, log: Callable[[str], None] = print) -> PreprocessSummary:
    """Write ``output_prefix.bin/.idx`` from the inputs; see ``tools/preprocess_data.py --help``."""
    check_can_write(output_prefix, overwrite)
    tok = load_tokenizer(tokenizer)
    dtype = DType.for_vocab(tok.vocab_size)
    total = None if dataset else sum(p.stat().st_size for p in expand_inputs(inputs or []))
    stats = SourceStats()
    docs = iter_documents(inputs, json_key=json_key, text_mode=text_mode, skip_bad_records=skip_bad_records,
                          stats=stats, dataset=dataset, split=split)
    bar = _progress(total, progress)
    t0 = time.perf_counter()
    n_docs = n_tokens = 0

    def emit(w: IndexedDatasetWriter, flat: np.ndarray, lengths: np.ndarray, chars: int) -> None:
        nonlocal n_docs, n_tokens
        w.add_packed(flat, lengths)
        n_docs += lengths.size
        n_tokens += flat.size
        if bar is not None:
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{n_docs / dt:,.0f} docs/s, {n_tokens / dt:,.0f} tok/s", refresh=False)
            bar.update(chars)

    try:
        with IndexedDatasetWriter(output_prefix, dtype, overwrite=overwrite, vocab_size=tok.vocab_size) as w:
            if workers <= 1:
                for texts, chars in _chunks(docs):
                    emit(w, *_encode_chunk(texts, tok, append_eod, dtype), chars)
            else:
                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                with ctx.Pool(workers, _init_worker, (tokenizer, append_eod, dtype.str)) as pool:
                    pending: deque = deque()
                    for texts, chars in _chunks(docs):
                        pending.append((pool.apply_async(_encode_chunk, (texts,)), chars))
                        while len(pending) > 2 * workers:
                            res, c = pending.popleft()
                            emit(w, *res.get(), c)
                    while pending:
                        res, c = pending.popleft()
                        emit(w, *res.get(), c)
            if n_docs == 0:
                where = f"dataset '{dataset}'" if dataset else ", ".join(map(str, inputs or []))
                raise DataError(f"{where}: no documents found (expected non-empty text under key '{json_key}')")
    finally:
        if bar is not None:
            if total:
                bar.n = total
            bar.close()
    summary = PreprocessSummary(n_docs, n_tokens, stats.skipped, time.perf_counter() - t0)
    log(summary.line(output_prefix))
    return summary
