"""Tokenize a corpus into a ``.bin/.idx`` pair: parallel across processes, streaming, in input order.

The main process reads documents and cuts them into chunks; worker processes tokenize chunks; the main process writes
results in submission order. At most ``2 * workers + 1`` chunks are in flight (``8 * workers`` at the start, while the
fast encoder is being checked), so memory stays bounded whatever the corpus size, and the output bytes do not depend on
``workers``.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import DataError
from .indexed import DType, IndexedDatasetWriter, check_can_write
from .progress import PreprocessProgress
from .reference import BackgroundReference, prefetch_reference
from .sources import SourceStats, iter_documents
from .tokenizer import Tokenizer, load_tokenizer

CHUNK_CHARS = 1 << 20  # about 1 MB of text per task: big enough to amortize IPC, small enough to bound memory
CHUNK_DOCS = 2048
# Chunks per worker handed out before the fast encoder's check has passed: enough to keep the workers busy until
# tokenizers, loading in its own process, has answered it (about a second for a 128k vocabulary under load; a worker
# encodes a chunk in ~0.1 s).
EARLY_CHUNKS_PER_WORKER = 8


@dataclass
class PreprocessSummary:
    documents: int
    tokens: int
    skipped: int
    seconds: float
    encoder: str = "encoder: tokenizers"  # the encoder line: which encoder applied the tokenizer, and why

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def line(self, prefix: str) -> str:
        s = (f"wrote {prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens, {self.seconds:.1f} s, "
             f"{self.tokens_per_second:,.0f} tokens/s; {self.encoder}")
        return s + (f", {self.skipped:,} bad records skipped" if self.skipped else "")


_WORKER: dict = {}


def _init_worker(tokenizer_path: str, append_eod: bool, dtype: str, encoder: str) -> None:
    # One process per core already; keep each tokenizer single-threaded so processes do not fight over cores.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "tok" not in _WORKER:  # a forked worker inherits the parent's tokenizer; a spawned one loads it (~0.1 s)
        _WORKER["tok"] = load_tokenizer(tokenizer_path, encoder)
    _WORKER["eod"] = append_eod
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_chunk(texts: list[str], tok: Tokenizer | None = None, append_eod: bool | None = None,
                  dtype: np.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of all texts concatenated (with EOD after each when asked) and the per-document lengths."""
    tok = tok or _WORKER["tok"]
    append_eod = _WORKER["eod"] if append_eod is None else append_eod
    dtype = _WORKER["dtype"] if dtype is None else dtype
    ids, lengths = tok.encode_packed(texts, append_eod)
    info = np.iinfo(dtype)
    if ids.size and (ids.min() < info.min or ids.max() > info.max):  # an id outside the dtype; say which
        bad = int(ids[(ids < info.min) | (ids > info.max)][0])
        raise DataError(f"{tok.file}: token id {bad} does not fit the output dtype {dtype.name} (expected ids "
                        f"{info.min}..{info.max}; the dtype was chosen from the vocabulary's largest id)")
    return ids.astype(dtype, copy=False), lengths


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
CHECK_CHARS = 1 << 18  # and at most this many characters of them: the check runs the slow encoder, before any worker


def check_sample(texts: list[str]) -> list[str]:
    """The start of the corpus the encoders are compared on: the first ``CHECK_DOCS`` documents, cut at
    ``CHECK_CHARS`` characters in all (a cut document is still text both must encode alike)."""
    out: list[str] = []
    room = CHECK_CHARS
    for t in texts[:CHECK_DOCS]:
        if room <= 0:
            break
        out.append(t[:room])
        room -= len(out[-1])
    return out


def check_encoder(tok: Tokenizer, texts: list[str]) -> str:
    """Check that ``tok``'s encoder gives exactly the ids of ``tokenizers`` on ``texts``; return what was found.

    Run on the corpus's first documents, in the main process, so the outcome does not depend on ``workers``. A
    difference stops an explicit ``--encoder tiktoken``; under ``auto`` the reference encoder takes over.
    """
    if tok.encoder == "tokenizers":
        return "not needed (tokenizers is the reference)"
    for i, (got, want) in enumerate(zip(tok.encode_batch(texts), tok.reference_encode_batch(texts))):
        if got != want:
            if tok.requested == "auto":
                tok.use_reference(f"tiktoken gave different ids for document {i + 1} of {len(texts)} checked")
                return f"differed on document {i + 1}: tokenizers used"
            raise DataError(f"{tok.file}: --encoder {tok.encoder} and tokenizers give different ids for document "
                            f"{i + 1} ({texts[i][:40]!r}...); use --encoder tokenizers for this tokenizer")
    return f"identical to tokenizers on the first {len(texts)} documents"


def encoder_line(tok: Tokenizer, check: str) -> str:
    """One line on which encoder applies the tokenizer, and why (printed and kept in the sidecar)."""
    if tok.requested == "auto" and tok.fallback:
        return f"encoder: tokenizers (auto: {tok.fallback})"
    how = "auto" if tok.requested == "auto" else "--encoder"
    return f"encoder: {tok.encoder} ({how}; {check})"


def preprocess(inputs: list[str] | None, tokenizer: str, output_prefix: str, workers: int = 1,
               append_eod: bool = False, overwrite: bool = False, skip_bad_records: bool = False,
               json_key: str = "text", text_mode: str = "block", dataset: str | None = None, split: str = "train",
               progress: bool = True, log: Callable[[str], None] = print, encoder: str = "auto",
               reference: BackgroundReference | None = None) -> PreprocessSummary:
    """Write ``output_prefix.bin/.idx`` from the inputs; see ``tools/preprocess_data.py --help``. ``reference``: the
    corpus check's ``tokenizers`` already loading (``prefetch_reference``); started here when not given."""
    pool, head, early = None, [], []
    try:
        check_can_write(output_prefix, overwrite)
        if not overwrite and Path(f"{output_prefix}.json").exists():
            raise DataError(f"{output_prefix}.json already exists (pass --overwrite to replace it)")
        reference = reference or prefetch_reference(tokenizer, encoder)
        tok = load_tokenizer(tokenizer, encoder, reference)
        dtype = token_dtype(tok)
        stats = SourceStats()
        docs = iter_documents(inputs, json_key=json_key, text_mode=text_mode, skip_bad_records=skip_bad_records,
                              stats=stats, dataset=dataset, split=split)
        chunks = _chunks(docs, stats)
        first = next(chunks, None)
        if workers > 1 and first is not None and tok.encoder == "tiktoken":
            # The workers start on the fast encoder while the main process checks it against tokenizers; nothing is
            # written before the check has passed, and a failed check discards their work.
            pool = _start_pool(tok, tokenizer, workers, append_eod, dtype)
            head = [first, *itertools.islice(chunks, EARLY_CHUNKS_PER_WORKER * workers - 1)]
            early = [(pool.apply_async(_encode_chunk, (texts,)), done) for texts, done in head]
        check = check_encoder(tok, check_sample(first[0])) if first else "no documents"
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if reference is not None:
            reference.close()  # answered and exited, or unused
    if pool is not None and tok.encoder != "tiktoken":  # auto fell back to tokenizers: start again with it
        pool.terminate()
        pool, early = None, []
        chunks = itertools.chain(head, chunks)
    elif pool is None:
        chunks = itertools.chain([first] if first else [], chunks)
    chosen = encoder_line(tok, check)
    log(chosen)
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
                for texts, done in chunks:
                    emit(w, *_encode_chunk(texts, tok, append_eod, dtype), done)
            else:
                with pool or _start_pool(tok, tokenizer, workers, append_eod, dtype) as pool:
                    pending: deque = deque(early)
                    for texts, done in chunks:
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
        if pool is not None:
            pool.terminate()
    summary = PreprocessSummary(n_docs, n_tokens, stats.skipped, time.perf_counter() - t0, chosen)
    write_sidecar(output_prefix, tok, chosen, summary, inputs, dataset)
    log(summary.line(output_prefix))
    return summary


def _start_pool(tok: Tokenizer, tokenizer: str, workers: int, append_eod: bool, dtype: np.dtype):
    """Worker processes for ``_encode_chunk``; forked ones inherit the loaded tokenizer instead of loading it."""
    fork = sys.platform.startswith("linux")
    ctx = mp.get_context("fork" if fork else "spawn")
    if fork:
        _WORKER["tok"] = tok
    try:
        return ctx.Pool(workers, _init_worker, (tokenizer, append_eod, dtype.str, tok.encoder))
    finally:
        _WORKER.pop("tok", None)


def write_sidecar(prefix: str, tok: Tokenizer, encoder: str, summary: PreprocessSummary, inputs: list[str] | None,
                  dataset: str | None) -> None:
    """``PREFIX.json`` beside the shards: how they were made (tokenizer hash, encoder and its check, inputs with their
    sizes, counts, the command line). Written atomically; never read by training."""
    import json

    files = [{"path": str(p), "bytes": os.path.getsize(p)} for p in (inputs or []) if os.path.isfile(p)]
    record = {
        "tokenizer": {"path": tok.file, "sha256": tok.sha256},
        "encoder": {"used": tok.encoder, "requested": tok.requested, "line": encoder},
        "inputs": files if inputs else [],
        "dataset": dataset,
        "documents": summary.documents,
        "tokens": summary.tokens,
        "skipped_records": summary.skipped,
        "seconds": round(summary.seconds, 3),
        "command": sys.argv,
    }
    path = f"{prefix}.json"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
