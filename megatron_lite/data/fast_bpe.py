"""An optional faster encoder for byte-level BPE tokenizers, through ``tiktoken`` (``--encoder tiktoken``).

Why: preprocessing spends nearly all its time inside the tokenizer. ``tiktoken`` applies a byte-level BPE faster
than ``tokenizers`` on the same cores (preprocessing ran 1.6-2.7x faster, ``docs/benchmarks.md``), and it is a small, well-kept library, so it is offered for the
tokenizers it can represent exactly: a ``tokenizers`` BPE with no normalizer, the byte-level pre-tokenizer (GPT-2's
split pattern, or an explicit ``Split`` pattern followed by a byte-level mapping, as Llama 3 does), no dropout or
subword prefixes, and whose merge list creates tokens in id order.

The two apply BPE differently: ``tokenizers`` applies the merge list in order; ``tiktoken`` repeatedly joins the
adjacent pair whose concatenation has the lowest id. For vocabularies learned by BPE training they agree on ordinary
text, but they can differ on rare strings, so the choice is the user's, and ``preprocess`` compares the two on the
first chunk of the corpus and stops with an error if any id differs. Either way the ids decode to the same text.
"""

from __future__ import annotations

import json
from typing import Any

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


def tiktoken_encoding(tokenizer_json: str, name: str) -> Any:
    """A ``tiktoken.Encoding`` equivalent to the tokenizer in ``tokenizer_json``; DataError saying why when there is
    none (``name`` is the tokenizer's file, for the message)."""
    try:
        import tiktoken
    except ImportError:
        raise DataError(f"{name}: --encoder tiktoken needs the tiktoken package (pip install tiktoken)") from None
    spec = json.loads(tokenizer_json)
    model = spec.get("model", {})
    why = _unsupported(spec, model)
    if why:
        raise DataError(f"{name}: --encoder tiktoken cannot represent this tokenizer ({why}); use --encoder tokenizers")
    alphabet = byte_level_alphabet()
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    ranks: dict[bytes, int] = {}
    for token, i in model["vocab"].items():
        if token in added:
            continue
        try:
            ranks[bytes(alphabet[c] for c in token)] = i
        except KeyError:
            raise DataError(f"{name}: token {token!r} is not byte-level; use --encoder tokenizers") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{name}: the vocabulary lacks {len(missing)} single bytes (e.g. {missing[0]}), so tiktoken "
                        "cannot encode every text; use --encoder tokenizers")
    return tiktoken.Encoding(name=f"megatron_lite:{name}", pat_str=split_pattern(spec.get("pre_tokenizer")),
                             mergeable_ranks=ranks, special_tokens=added)


def _unsupported(spec: dict[str, Any], model: dict[str, Any]) -> str | None:
    """What keeps the tokenizer from being a plain byte-level BPE that tiktoken can run, or None."""
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r}, expected BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE dropout or subword prefixes/suffixes"
    if model.get("byte_fallback"):
        return "byte fallback"
    if spec.get("normalizer") is not None:
        return "a normalizer"
    if split_pattern(spec.get("pre_tokenizer")) is None:
        return "a pre-tokenizer other than the byte-level one"
    for t in spec.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return f"added token {t['content']!r} strips whitespace or matches single words only"
    vocab = model["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    created = [vocab.get(a + b) for a, b in merges]
    if any(i is None for i in created) or any(x >= y for x, y in zip(created, created[1:])):
        return "its merges do not create tokens in id order"
    return None
