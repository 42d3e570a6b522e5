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
from .progress import PreprocessProgress
from .sources import SourceStats, iter_documents
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


def _init_worker(tokenizer_path: str, append_eod: bool, dtype: str, encoder: str) -> None:
    # One process per core already; keep each tokenizer single-threaded so processes do not fight over cores.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = load_tokenizer(tokenizer_path, encoder)
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
    try:
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    except OverflowError:  # numpy refuses an id outside the dtype; find it and say which
        info = np.iinfo(dtype)
        bad = next(i for x in ids for i in x if not info.min <= i <= info.max)
        raise DataError(f"{tok.file}: token id {bad} does not fit the output dtype {dtype.name} (expected ids "
                        f"{info.min}..{info.max}; the dtype was chosen from the vocabulary's largest id)") from None
    return flat, lengths


def token_dtype(tok: Tokenizer) -> np.dtype:
    """The ``.bin`` dtype for every id the tokenizer has: chosen from the largest id + 1, not the number of entries,
    since ids may have gaps and added tokens may sit far above the base vocabulary."""
    if tok.max_id > np.iinfo(np.int32).max:
        raise DataError(f"{tok.file}: token id {tok.max_id} ({tok.max_token!r}) does not fit int32, the widest token "
                        f"dtype (expected ids up to {np.iinfo(np.int32).max:,})")
    return DType.for_vocab(tok.max_id + 1)


def _chunks(docs: Iterable[str], stats: SourceStats) -> Iterator[tuple[list[str], int]]:
    """Documents in chunks, each with how far the reading had got when it was cut (for the progress bar)."""
    buf: list[str] = []
    chars = 0
    for d in docs:
        buf.append(d)
        chars += len(d)
        if chars >= CHUNK_CHARS or len(buf) >= CHUNK_DOCS:
            yield buf, stats.done
            buf, chars = [], 0
    if buf:
        yield buf, stats.done


CHECK_DOCS = 256  # documents at the start of the corpus on which another encoder must agree with tokenizers


def check_encoder(tok: Tokenizer, texts: list[str]) -> None:
    """Stop unless ``tok``'s encoder gives exactly the ids of ``tokenizers`` on ``texts`` (a no-op for tokenizers).

    Run on the corpus's first documents, in the main process, so the outcome does not depend on ``workers``.
    """
    if tok.encoder == "tokenizers":
        return
    for i, (got, want) in enumerate(zip(tok.encode_batch(texts), tok.reference_encode_batch(texts))):
        if got != want:
            raise DataError(f"{tok.file}: --encoder {tok.encoder} and tokenizers give different ids for document "
                            f"{i + 1} ({texts[i][:40]!r}...); use --encoder tokenizers for this tokenizer")


def _checked(chunks: Iterator[tuple[list[str], int]], tok: Tokenizer) -> Iterator[tuple[list[str], int]]:
    """``chunks``, after checking the encoder on the first chunk's first documents."""
    for i, (texts, done) in enumerate(chunks):
        if i == 0:
            check_encoder(tok, texts[:CHECK_DOCS])
        yield texts, done


def preprocess(inputs: list[str] | None, tokenizer: str, output_prefix: str, workers: int = 1,
               append_eod: bool = False, overwrite: bool = False, skip_bad_records: bool = False,
               json_key: str = "text", text_mode: str = "block", dataset: str | None = None, split: str = "train",
               progress: bool = True, log: Callable[[str], None] = print,
               encoder: str = "tokenizers") -> PreprocessSummary:
    """Write ``output_prefix.bin/.idx`` from the inputs; see ``tools/preprocess_data.py --help``."""
    check_can_write(output_prefix, overwrite)
    tok = load_tokenizer(tokenizer, encoder)
    dtype = token_dtype(tok)
    stats = SourceStats()
    docs = iter_documents(inputs, json_key=json_key, text_mode=text_mode, skip_bad_records=skip_bad_records,
                          stats=stats, dataset=dataset, split=split)
    bar = PreprocessProgress(stats.total, stats.unit, enabled=progress)
    t0 = time.perf_counter()
    n_docs = n_tokens = 0

    def emit(w: IndexedDatasetWriter, flat: np.ndarray, lengths: np.ndarray, done: int) -> None:
        nonlocal n_docs, n_tokens
        w.add_packed(flat, lengths)
        n_docs += lengths.size
        n_tokens += flat.size
        bar.update(done, n_docs, n_tokens)

    ok = False
    try:
        with IndexedDatasetWriter(output_prefix, dtype, overwrite=overwrite, vocab_size=tok.max_id + 1) as w:
            if workers <= 1:
                for texts, done in _checked(_chunks(docs, stats), tok):
                    emit(w, *_encode_chunk(texts, tok, append_eod, dtype), done)
            else:
                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                with ctx.Pool(workers, _init_worker, (tokenizer, append_eod, dtype.str, encoder)) as pool:
                    pending: deque = deque()
                    for texts, done in _checked(_chunks(docs, stats), tok):
                        pending.append((pool.apply_async(_encode_chunk, (texts,)), done))
                        while len(pending) > 2 * workers:
                            res, d = pending.popleft()
                            emit(w, *res.get(), d)
                    while pending:
                        res, d = pending.popleft()
                        emit(w, *res.get(), d)
            if n_docs == 0:
                where = f"dataset '{dataset}'" if dataset else ", ".join(map(str, inputs or []))
                raise DataError(f"{where}: no documents found (expected non-empty text under key '{json_key}')")
        ok = True
    finally:
        bar.close(keep=ok)
    summary = PreprocessSummary(n_docs, n_tokens, stats.skipped, time.perf_counter() - t0)
    log(summary.line(output_prefix))
    return summary
