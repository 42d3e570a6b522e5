"""A faster encoder for byte-level BPE tokenizers through ``tiktoken``, used only where it gives ``tokenizers``' ids.

Why: preprocessing spends nearly all its time inside the tokenizer, and ``tiktoken`` applies a byte-level BPE several
times faster than ``tokenizers`` on the same cores (``docs/benchmarks.md``). It can stand in for the published
byte-level BPEs (GPT-2's in either published form, Llama 3's, Qwen's with its NFC normalizer, Mistral's tekken as
converted to ``tokenizer.json``) and for the ones ``train_tokenizer.py`` writes.

The two libraries apply BPE differently. ``tokenizers`` repeatedly merges the adjacent pair that comes first in the
merge list; ``tiktoken`` repeatedly joins the adjacent pair whose concatenation has the lowest rank, whatever the two
parts, and returns a piece that is itself in the vocabulary without merging at all. The ranks are derived from the
merge list: a token's rank is the index of the first merge that creates it (single bytes rank below every merge; with
``ignore_merges``, tokens no merge creates rank above them all). Then the two agree on every input when

1. the merges creating one token are contiguous in the list and ordered like their tokens' ranks (checked), and
2. every token, encoded on its own without the whole-word shortcut, comes out the same from both (checked for every
   token of the vocabulary, by both libraries); without ``ignore_merges``, a token ``tokenizers`` cannot rebuild from
   its bytes is dropped from the ranks, since ``tokenizers`` can never produce it either.

Why that suffices: in either algorithm the pair that finally forms a token in any context is the last pair of that
token encoded alone (the merges inside its span happen in the same order as in isolation), so (2) makes the pairs that
ever merge the same; (1) makes the two orders of those pairs the same, ties included (leftmost first in both). Python
models of both algorithms, compared on 3,000 random merge lists over three letters (every string of up to 7) and 3,000
over two (up to 10), each with and without ``ignore_merges``, differed on no list where both conditions hold; the
tests run the two libraries themselves on such lists. ``preprocess`` still compares the two encoders on the start of
every corpus, and a difference there makes ``auto`` use ``tokenizers``, so a gap in this reasoning costs speed, never
correctness.

Also handled: ids in any order (``tiktoken`` ranks are mapped to ids through a table), several merges per token,
``ignore_merges``, added tokens (matched in the text as ``tokenizers`` matches them; refused where one is a prefix of
another, since the two libraries then pick different matches), and an NFC normalizer, applied in Python to the text
between added tokens, as ``tokenizers`` applies it (NFC over the whole text would, for one, join an added token's
closing ``>`` with a combining U+0338 after it). Not representable, with the reason given: other models
(Unigram/SentencePiece, WordPiece), byte fallback, dropout, subword prefixes, other normalizers or pre-tokenizers. The
split regexes run in different engines (fancy-regex in ``tiktoken``, Oniguruma in ``tokenizers``); the corpus check
covers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

# The split pattern of the byte-level pre-tokenizer with use_regex=True (GPT-2's).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level pre-tokenizer's printable stand-in character for each byte, as {character: byte}.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in order, to code points from 256 up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _to_latin1_table() -> dict[int, str]:
    """A ``str.translate`` table from byte-level characters to the Latin-1 character of their byte; characters
    outside the alphabet become one that Latin-1 cannot encode, so a non-byte-level token fails loudly."""
    table = {ord(c): chr(b) for c, b in byte_level_alphabet().items()}
    for c in range(256):
        table.setdefault(c, "\uffff")
    return table


_LATIN1 = _to_latin1_table()


def split_pattern(pre_tokenizer: dict[str, Any] | None) -> str | None:
    """The regex a pre-tokenizer splits text with when it is a plain byte-level one, else None."""
    if not pre_tokenizer:
        return None
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel":
        ok = pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space", False)
        return GPT2_SPLIT_PATTERN if ok else None
    if kind == "Sequence":
        steps = pre_tokenizer.get("pretokenizers", [])
        if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
            return None
        split, byte_level = steps
        pattern = split.get("pattern", {}).get("Regex")
        if pattern is None or split.get("behavior") != "Isolated" or split.get("invert", False):
            return None
        if byte_level.get("use_regex", True) or byte_level.get("add_prefix_space", False):
            return None
        return pattern
    return None


def _normalizer(spec: dict[str, Any] | None) -> str | None | bool:
    """``None`` for no normalizer, ``"NFC"`` for NFC (alone or as the only step of a sequence), False otherwise."""
    if spec is None:
        return None
    if spec.get("type") == "Sequence":
        steps = spec.get("normalizers", [])
        return _normalizer(steps[0]) if len(steps) == 1 else (None if not steps else False)
    return "NFC" if spec.get("type") == "NFC" else False


class FastBPE:
    """A byte-level BPE applied by ``tiktoken`` with ``tokenizers``' ids: what ``--encoder tiktoken`` runs."""

    def __init__(self, encoding: Any, rank_to_id: np.ndarray | None, nfc: bool, added: dict[str, int]) -> None:
        self.encoding = encoding
        self.rank_to_id = rank_to_id  # None when the ranks are the ids
        self.nfc = nfc
        self.added = added
        self._added_rank = {c: encoding._special_tokens[c] for c in added}
        # Added tokens are found before normalization, like tokenizers' non-normalized added tokens.
        self._added_re = re.compile("|".join(re.escape(c) for c in sorted(added, key=len, reverse=True))) \
            if added else None

    def encode_ranks(self, text: str) -> np.ndarray:
        """tiktoken's ranks for one text as uint32 (added tokens written in the text become their tokens), straight
        from tiktoken's buffer: no Python int per token."""
        enc = self.encoding
        if not self.nfc or text.isascii():  # NFC leaves ASCII unchanged
            return enc.encode_to_numpy(text, allowed_special="all")
        if self._added_re is None or not self._added_re.search(text):
            return self._ordinary(unicodedata.normalize("NFC", text))
        parts: list[np.ndarray] = []
        start = 0
        for m in self._added_re.finditer(text):
            parts.append(self._ordinary(unicodedata.normalize("NFC", text[start:m.start()])))
            parts.append(np.array([self._added_rank[m.group()]], dtype=np.uint32))
            start = m.end()
        parts.append(self._ordinary(unicodedata.normalize("NFC", text[start:])))
        return np.concatenate(parts)

    def _ordinary(self, text: str) -> np.ndarray:
        """Ranks with added tokens' text encoded as ordinary text (tiktoken's ``encode_ordinary``)."""
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def to_ids(self, ranks: np.ndarray) -> np.ndarray:
        """Token ids (int64) for an array of ranks."""
        return ranks.astype(np.int64, copy=False) if self.rank_to_id is None else self.rank_to_id[ranks]

    def encode(self, text: str) -> list[int]:
        return self.to_ids(self.encode_ranks(text)).tolist()


CACHE_FORMAT = 3  # bump when what is cached, or how it is derived, changes


def cache_dir() -> Path | None:
    """Where checked rank tables are kept (``MEGATRON_LITE_CACHE``, else ``~/.cache/megatron_lite``); None when the
    variable is set empty, which turns the cache off."""
    root = os.environ.get("MEGATRON_LITE_CACHE")
    if root == "":
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron_lite"
    return base / "fast_bpe"


def fast_bpe(path: str, reference: Any, facts: dict | None = None, digest: str | None = None) -> FastBPE:
    """A :class:`FastBPE` giving exactly the ids of the tokenizer file ``path`` (``reference`` is that file loaded by
    ``tokenizers``, used to check every token); DataError saying why when there is none.

    Checking every token of a 128k vocabulary takes seconds, so the checked table is cached under the file's sha256
    (``digest``, computed when not given) and both libraries' versions (:func:`cache_dir`), with ``facts``: what the
    caller needs from the vocabulary, so that a cache hit (:func:`cached_table`) needs no ``tokenizers`` load."""
    tiktoken = _tiktoken(path)
    data = Path(path).read_bytes()
    fast = _derive(data, path, reference, tiktoken)
    _save_cached(_cache_key(digest or hashlib.sha256(data).hexdigest(), tiktoken), fast, facts or {})
    return fast


def cached_table(digest: str) -> Path | None:
    """The cached, checked table of the tokenizer file whose sha256 is ``digest``, if the cache holds one (found
    before it is loaded, so that a caller can start other work first)."""
    root = cache_dir()
    try:
        tiktoken = _tiktoken("")
    except DataError:
        return None
    file = root / f"{_cache_key(digest, tiktoken)}.npz" if root else None
    return file if file is not None and file.is_file() else None


def load_cached(table: Path, path: str) -> tuple[FastBPE, dict] | None:
    """The :class:`FastBPE` and the facts kept in ``table`` (from :func:`cached_table`) for the tokenizer file
    ``path``; None when the table is unreadable (it is then derived again, and overwritten)."""
    return _load_cached(table, _tiktoken(path), path)


def _tiktoken(path: str) -> Any:
    try:
        import tiktoken
    except ImportError:
        raise DataError(f"{path}: --encoder tiktoken needs the tiktoken package (pip install tiktoken)") from None
    return tiktoken


def _derive(data: bytes, name: str, reference: Any, tiktoken: Any) -> FastBPE:
    def refuse(why: str) -> DataError:
        return DataError(f"{name}: --encoder tiktoken cannot represent this tokenizer ({why}); "
                         "use --encoder tokenizers")

    spec = json.loads(data)
    model = spec.get("model", {})
    # Added tokens as tokenizers loaded them: it keeps a listed id only where the content is also in the vocabulary.
    decoder = reference.get_added_tokens_decoder()
    why = _unsupported(spec, model, list(decoder.values()))
    if why:
        raise refuse(why)
    added = {t.content: i for i, t in decoder.items()}
    vocab: dict[str, int] = model["vocab"]
    ignore_merges = bool(model.get("ignore_merges"))
    ranks, why = _ranks_from_merges(vocab, model.get("merges", []), set(added), ignore_merges)
    if why:
        raise refuse(why)
    theirs = _reference_alone(reference, [t for t, r in ranks.items() if r >= 256])
    if not ignore_merges:  # tokenizers can never produce a token it does not rebuild from the token's own bytes
        for t, ids in theirs.items():
            if ids != [vocab[t]]:
                del ranks[t]
    mergeable, specials, lut = _tables(name, ranks, vocab, added)
    pattern = split_pattern(spec.get("pre_tokenizer"))
    fast = FastBPE(_encoding(tiktoken, name, pattern, mergeable, specials), lut,
                   _normalizer(spec.get("normalizer")) == "NFC", added)
    tokens = [t for t, r in ranks.items() if r >= 256]
    ours = _isolated(fast, [t.translate(_LATIN1).encode("latin-1") for t in tokens])
    for t, ids in zip(tokens, ours):
        if ids != theirs[t]:
            raise refuse(f"token {t!r} encoded alone gives {ids} with tiktoken and {theirs[t]} with tokenizers")
    return fast


def _cache_key(digest: str, tiktoken: Any) -> str:
    import tokenizers

    versions = f"{CACHE_FORMAT}:{tiktoken.__version__}:{tokenizers.__version__}:{digest}".encode()
    return hashlib.sha256(versions).hexdigest()


def _load_cached(file: Path, tiktoken: Any, name: str) -> tuple[FastBPE, dict] | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            blob, offsets, values = z["tokens"].tobytes(), z["offsets"].tolist(), z["values"].tolist()
            meta = json.loads(str(z["meta"]))
            lut = z["lut"] if z["lut"].size else None
        if not meta.get("facts"):
            return None
    except (OSError, ValueError, KeyError):
        return None  # unreadable: derive again (and overwrite it)
    mergeable = {blob[a:b]: v for a, b, v in zip(offsets, offsets[1:], values)}
    enc = _encoding(tiktoken, name, meta["pattern"], mergeable, meta["specials"])
    return FastBPE(enc, lut, meta["nfc"], meta["added"]), meta["facts"]


def _save_cached(key: str, fast: FastBPE, facts: dict) -> None:
    root = cache_dir()
    if root is None:
        return
    enc = fast.encoding
    tokens = list(enc._mergeable_ranks)
    offsets = np.cumsum([0] + [len(t) for t in tokens])
    meta = {"pattern": enc._pat_str, "specials": enc._special_tokens, "nfc": fast.nfc, "added": fast.added,
            "facts": facts}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, tokens=np.frombuffer(b"".join(tokens), dtype=np.uint8), offsets=offsets,
                 values=np.fromiter(enc._mergeable_ranks.values(), dtype=np.int64, count=len(tokens)),
                 lut=fast.rank_to_id if fast.rank_to_id is not None else np.zeros(0, dtype=np.int64),
                 meta=np.array(json.dumps(meta)))
        os.replace(tmp, root / f"{key}.npz")
    except OSError:
        pass  # a read-only or full cache costs time on the next load, nothing else


def _ranks_from_merges(vocab: dict[str, int], merges: list, added: set[str],
                       ignore_merges: bool) -> tuple[dict[str, int], str | None]:
    """tiktoken ranks by token (byte-level string): bytes 0-255, then 256 + the index of the first merge creating the
    token; with ignore_merges, tokens no merge creates after all of those. Or the reason there are none."""
    alphabet = byte_level_alphabet()
    missing = [b for c, b in alphabet.items() if c not in vocab or c in added]
    if missing:
        return {}, f"the vocabulary lacks {len(missing)} single bytes (e.g. {missing[0]}), so tiktoken cannot encode " \
                   "every text"
    ranks: dict[str, int] = {c: b for c, b in alphabet.items()}
    seen: set[tuple[str, str]] = set()
    last = -1
    for i, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        token = a + b
        if (a, b) in seen:
            return {}, f"the merge {a!r} + {b!r} is listed twice"
        seen.add((a, b))
        first = ranks.setdefault(token, 256 + i)
        if first < last:  # merges creating an earlier token must not come after merges creating a later one
            return {}, f"merge {i} ({a!r} + {b!r}) creates {token!r} after merges creating later tokens"
        last = first
    n = 256 + len(merges)
    for token in vocab:
        if token not in ranks and token not in added:
            if not ignore_merges:
                continue  # tokenizers can never produce a token no merge creates
            ranks[token] = n
            n += 1
    return ranks, None


def _tables(name: str, ranks: dict[str, int], vocab: dict[str, int],
            added: dict[str, int]) -> tuple[dict[bytes, int], dict[str, int], np.ndarray | None]:
    """tiktoken's mergeable ranks and special tokens for ``ranks``, and the rank -> id table (None when the ranks can
    simply be the ids, i.e. the ids of multi-byte tokens increase with their ranks)."""
    by_rank = sorted((r, t) for t, r in ranks.items())
    multi = [vocab[t] for r, t in by_rank if r >= 256]
    same_order = all(x < y for x, y in zip(multi, multi[1:]))
    mergeable: dict[bytes, int] = {}
    try:
        for r, t in by_rank:
            mergeable[t.translate(_LATIN1).encode("latin-1")] = vocab[t] if same_order else r
    except UnicodeEncodeError:
        bad = next(t for _, t in by_rank if "\uffff" in t.translate(_LATIN1))
        raise DataError(f"{name}: token {bad!r} is not byte-level; use --encoder tokenizers") from None
    if same_order:
        return mergeable, dict(added), None
    top = max(ranks.values()) + 1
    specials = {c: top + k for k, c in enumerate(added)}
    lut = np.zeros(top + len(added), dtype=np.int64)
    for t, r in ranks.items():
        lut[r] = vocab[t]
    for c, i in added.items():
        lut[specials[c]] = i
    return mergeable, specials, lut


def _encoding(tiktoken: Any, name: str, pattern: str, mergeable: dict[bytes, int], specials: dict[str, int]) -> Any:
    return tiktoken.Encoding(name=f"megatron_lite:{name}", pat_str=pattern, mergeable_ranks=mergeable,
                             special_tokens=specials)


def _reference_alone(reference: Any, tokens: list[str]) -> dict[str, list[int]]:
    """The ids ``tokenizers`` gives each token encoded alone, by its merges (never returned whole: ignore_merges is
    switched off for the call, then restored)."""
    from tokenizers import Tokenizer as HFTokenizer

    model = reference.model
    bare = HFTokenizer(model)  # the same model with no normalizer, pre-tokenizer or added tokens: one word per token
    saved = bool(getattr(model, "ignore_merges", False))
    try:
        model.ignore_merges = False
        encoded = bare.encode_batch_fast(tokens, add_special_tokens=False)
    finally:
        model.ignore_merges = saved
        model._clear_cache()  # holds words encoded without the shortcut
    return {t: e.ids for t, e in zip(tokens, encoded)}


def _isolated(fast: FastBPE, tokens: list[bytes]) -> list[list[int]]:
    """Ids tiktoken's BPE gives each token's bytes alone, without returning a vocabulary entry whole.

    A byte that no multi-byte token contains is appended, so the piece is not in the vocabulary but merges exactly as
    the token would; its own id is then removed."""
    used = set(b"".join(tokens))
    free = next((b for b in range(255, -1, -1) if b not in used), None)
    if free is None:
        out = [_merge_alone(fast.encoding, t) for t in tokens]
    else:
        sentinel = bytes([free])
        piece = fast.encoding._core_bpe.encode_single_piece
        out = [piece(t + sentinel)[:-1] for t in tokens]
    if fast.rank_to_id is None:
        return out
    return [fast.rank_to_id[np.asarray(x, dtype=np.int64)].tolist() for x in out]


def _merge_alone(enc: Any, token: bytes) -> list[int]:
    """tiktoken's merge loop in Python, for vocabularies in which every byte occurs in some multi-byte token."""
    ranks = enc._mergeable_ranks
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return [ranks[p] for p in parts]
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _unsupported(spec: dict[str, Any], model: dict[str, Any], added: list[Any]) -> str | None:
    """What keeps the tokenizer from being a byte-level BPE that tiktoken can run, or None (``added``: its added
    tokens, as ``tokenizers.AddedToken``)."""
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r}, expected BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE dropout or subword prefixes/suffixes"
    if model.get("byte_fallback"):
        return "byte fallback"
    normalizer = _normalizer(spec.get("normalizer"))
    if normalizer is False:
        return f"normalizer {spec['normalizer'].get('type')!r}; only NFC is applied exactly"
    if split_pattern(spec.get("pre_tokenizer")) is None:
        return "a pre-tokenizer other than the byte-level one"
    for t in added:
        if t.lstrip or t.rstrip or t.single_word:
            return f"added token {t.content!r} strips whitespace or matches single words only"
        if normalizer and t.normalized:
            return f"added token {t.content!r} is matched after normalization"
    contents = sorted(t.content for t in added)
    for a, b in zip(contents, contents[1:]):
        if b.startswith(a):  # tokenizers takes the longest match, tiktoken the first alternative
            return f"added token {a!r} is a prefix of added token {b!r}"
    return None

