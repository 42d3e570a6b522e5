"""Load a trained tokenizer (a ``tokenizer.json`` or an HF tokenizer directory) and find its special ids.

The rest of the pipeline needs only ``encode``, ``max_id``, ``eod_id`` and ``pad_id``; this wrapper gives exactly
that over the HF ``tokenizers`` library, so preprocessing workers can rebuild it from a path cheaply. Where the fast
encoder's checked table is cached (``fast_bpe``), the sizes and special ids come with it and ``tokenizers`` is loaded
only when first used.

Accepted: a ``tokenizers`` JSON file, or a directory holding ``tokenizer.json`` (what ``train_tokenizer.py`` and
``PreTrainedTokenizerFast.save_pretrained`` write); the eos and pad names are taken from ``tokenizer_config.json`` or
``special_tokens_map.json`` beside it when present. Rejected: directories with only a slow tokenizer (``vocab.json`` +
``merges.txt``, a SentencePiece ``tokenizer.model``), since loading those needs ``transformers`` and a conversion.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np

from .errors import DataError, first_line
from .fast_bpe import FastBPE, cached_table, fast_bpe, load_cached
from .reference import BackgroundReference, encode_reference, load_reference

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SENTINEL_FORMAT = "<extra_id_{}>"

ENCODERS = ("auto", "tokenizers", "tiktoken")
_SLOW_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt")

# Names other tokenizers use for the same roles, tried in order after ours.
_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class Tokenizer:
    """A byte-level BPE (or any ``tokenizers`` model) with the ids the data pipeline needs."""

    def __init__(self, path: str | os.PathLike, encoder: str = "tokenizers",
                 reference: BackgroundReference | None = None) -> None:
        self.path = str(path)
        file, config = _resolve(Path(path))
        self.file = str(file)
        if encoder not in ENCODERS:
            raise DataError(f"encoder {encoder!r}: expected one of {', '.join(ENCODERS)}")
        self.requested = encoder  # what was asked for; ``encoder`` is what applies it
        self.fallback: str | None = None  # with auto: why the reference encoder is used, if it is
        self._fast: FastBPE | None = None
        self._hf = None
        self._background = reference  # tokenizers loading in another process, for the first reference call
        self._ids: dict[str, int | None] = {}  # ids known without loading tokenizers (kept with a cached table)
        facts = None
        if encoder in ("tiktoken", "auto"):
            # A cached, checked table also holds the sizes and special ids, so tokenizers itself is loaded only when
            # something needs it: preprocessing's corpus check, while the workers already encode.
            table = cached_table(self.sha256)
            hit = load_cached(table, self.file) if table is not None else None
            if hit is not None:
                self._fast, facts = hit
                self._ids = facts["ids"]
        if facts is None:
            facts = self._facts()
            if encoder in ("tiktoken", "auto"):
                try:
                    self._fast = fast_bpe(self.file, self._tok, facts, self.sha256)
                except DataError as e:
                    if encoder == "tiktoken":
                        raise
                    why = str(e).removeprefix(f"{self.file}: ")
                    self.fallback = why.rsplit("; use --encoder tokenizers", 1)[0]
        self.vocab_size: int = facts["vocab_size"]  # entries, not the id range
        # The largest id sizes the .bin dtype and the embedding: ids may have gaps, added tokens may sit high.
        self.max_token, self.max_id = facts["max_token"], facts["max_id"]
        self.eod_id: int = self._special(config.get("eos_token"), _EOD_CANDIDATES, "end-of-document")
        pad = self._lookup(config.get("pad_token"), _PAD_CANDIDATES)
        self.pad_id: int = self.eod_id if pad is None else pad
        self.sentinel_ids: list[int] = []
        while (i := self._token_id(SENTINEL_FORMAT.format(len(self.sentinel_ids)))) is not None:
            self.sentinel_ids.append(i)
        self.encoder = "tiktoken" if self._fast is not None else "tokenizers"
        if self._background is not None and (self._fast is None or self._hf is not None):
            self._background.close()  # no check to run, or tokenizers is loaded here already (the table was derived)
            self._background = None

    @functools.cached_property
    def sha256(self) -> str:
        """The tokenizer file's sha256: keys the fast encoder's cache and is recorded beside the shards."""
        return hashlib.sha256(Path(self.file).read_bytes()).hexdigest()

    @property
    def _tok(self):
        """The ``tokenizers.Tokenizer``, loaded on first use."""
        if self._hf is None:
            self._hf = load_reference(self.file)
        return self._hf

    def _facts(self) -> dict:
        """What the pipeline needs from the vocabulary, kept with a cached table: sizes, the largest id, and the ids
        of every name looked up for a special role (None where absent)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"{self.file}: tokenizer has an empty vocabulary (expected a trained tokenizer)")
        max_token, max_id = max(vocab.items(), key=lambda kv: kv[1])
        added = (t.content for t in self._tok.get_added_tokens_decoder().values())
        names = [*_EOD_CANDIDATES, *_PAD_CANDIDATES, *added]
        k = 0
        while SENTINEL_FORMAT.format(k) in vocab:
            k += 1
        names += [SENTINEL_FORMAT.format(i) for i in range(k + 1)]
        return {"vocab_size": self._tok.get_vocab_size(with_added_tokens=True), "max_token": max_token,
                "max_id": max_id, "ids": {n: vocab.get(n) for n in names}}

    def _token_id(self, name: str) -> int | None:
        if self._hf is None and name in self._ids:
            return self._ids[name]
        return self._tok.token_to_id(name)

    def use_reference(self, why: str) -> None:
        """Apply ``tokenizers`` from now on (auto, when the fast encoder disagreed with it), recording why."""
        self._fast, self.encoder, self.fallback = None, "tokenizers", why

    def _lookup(self, configured, candidates) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for name in ([configured] if configured else []) + list(candidates):
            i = self._token_id(name)
            if i is not None:
                return i
        return None

    def _special(self, configured, candidates, role: str) -> int:
        i = self._lookup(configured, candidates)
        if i is None:
            raise DataError(f"{self.file}: no {role} token (expected one of {', '.join(candidates)})")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, with the chosen encoder (added tokens written literally in the text become their ids)."""
        if self._fast is None:
            return self.reference_encode_batch(texts)
        return [self._fast.to_ids(r).tolist() for r in _encode_slices(self._fast, texts, _threads())]

    def encode_packed(self, texts: list[str], append_eod: bool) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int64, with the EOD id after each text when asked) and each text's length:
        what a shard stores, without a Python int per token under the fast encoder."""
        if self._fast is not None:
            ranks = _encode_slices(self._fast, texts, _threads())
            lengths = np.fromiter((r.size for r in ranks), dtype=np.int64, count=len(ranks))
            flat = self._fast.to_ids(np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.uint32))
        else:
            ids = self.reference_encode_batch(texts)
            lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        if append_eod:
            ends = np.cumsum(lengths)
            flat = np.insert(flat, ends, self.eod_id)
            lengths = lengths + 1
        return flat, lengths

    def reference_encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids from ``tokenizers`` itself: the first call answered by the process loading it in the background,
        where one was started and tokenizers is not loaded here."""
        background, self._background = self._background, None
        if background is not None:
            if self._hf is None:
                return background.encode_batch(texts)
            background.close()
        return encode_reference(self._tok, texts)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok


def _threads() -> int:
    """Threads for tiktoken: one inside a preprocessing worker (one process per core already), else every core."""
    return 1 if os.environ.get("RAYON_NUM_THREADS") == "1" else (os.cpu_count() or 1)


def _encode_slices(fast: FastBPE, texts: list[str], threads: int) -> list[np.ndarray]:
    """tiktoken's ranks over contiguous slices of ``texts``, one per thread (it releases the GIL while encoding).

    tiktoken's own ``encode_batch`` submits one task per text, which costs more than encoding a short document.
    """
    def run(part: list[str]) -> list[np.ndarray]:
        return [fast.encode_ranks(t) for t in part]

    if threads <= 1 or len(texts) < 2 * threads:
        return run(texts)
    from concurrent.futures import ThreadPoolExecutor

    step = -(-len(texts) // threads)
    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(run, [texts[i:i + step] for i in range(0, len(texts), step)])
    return [ids for part in parts for ids in part]


def _resolve(path: Path) -> tuple[Path, dict]:
    """Find the JSON file, plus the eos/pad names from the HF ``special_tokens_map.json`` and ``tokenizer_config.json``
    beside it (older ``transformers`` versions write the names in the first, newer ones in the second)."""
    if not path.exists():
        raise DataError(f"{path}: tokenizer not found (expected a tokenizer.json file or a directory holding one)")
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            slow = [n for n in _SLOW_FILES if (path / n).is_file()]
            found = f"only a slow tokenizer ({', '.join(slow)}), " if slow else ""
            raise DataError(f"{path}: directory has {found}no tokenizer.json (expected an HF fast-tokenizer directory; "
                            f"convert with AutoTokenizer.from_pretrained(dir).save_pretrained(new_dir))")
    else:
        file = path
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins where both name a token
        cfg_file = file.parent / name
        if cfg_file.is_file():
            try:
                loaded = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise DataError(f"{cfg_file}: unreadable tokenizer config ({first_line(e)}); expected JSON") from None
            if not isinstance(loaded, dict):
                raise DataError(f"{cfg_file}: tokenizer config is a JSON {type(loaded).__name__}, expected an object")
            config.update({k: v for k, v in loaded.items() if v is not None})
    return file, config


def load_tokenizer(path: str | os.PathLike, encoder: str = "tokenizers",
                   reference: BackgroundReference | None = None) -> Tokenizer:
    """Load ``path`` (a tokenizer.json, or a directory with one); :class:`DataError` if it cannot be used.

    ``encoder`` is what applies it: ``tokenizers`` (the reference), ``tiktoken`` (faster, see ``fast_bpe``), or
    ``auto`` (tiktoken where it can represent the tokenizer exactly, else tokenizers; ``fallback`` says why).
    ``reference``: ``tokenizers`` already loading this file in another process (``reference.prefetch_reference``),
    to answer the first :meth:`Tokenizer.reference_encode_batch` call (preprocessing's corpus check).
    """
    return Tokenizer(path, encoder, reference)
