"""``--encoder auto`` on tokenizers built like the published byte-level BPEs: tiktoken where it gives exactly
``tokenizers``' ids (byte-identical shards), one line naming the reason where it cannot.

The fixtures are small BPEs trained here and rebuilt in each published structure: GPT-2's original one merge per
token, ``TikTokenConverter``'s every split of every token with ``ignore_merges`` (several merges per token), ids out of
merge order, Llama 3's split pattern, Qwen's NFC normalizer, tekken's special ids below the vocabulary.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest

from megatron_lite.data import load_tokenizer
from megatron_lite.data.fast_bpe import GPT2_SPLIT_PATTERN, byte_level_alphabet
from megatron_lite.data.preprocess import preprocess
from megatron_lite.data.reference import prefetch_reference

pytest.importorskip("tiktoken")

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TRAIN = [
    "The tokenizer's merges were learned from this text; they'll cover words we'd see again and again.",
    "Numbers 1234567 and 2026-12-06, prices $19.99, code x = f(y) + 3 * z; DON'T SHOUT, it's fine.",
    "Café, naïve, résumé, Ångström, straße, Ελληνικά, русский, 日本語のテキスト, emoji 🙂🙂.",
    "Tabs\tand  double  spaces,\nnew lines\r\nand trailing spaces   \n\n",
] * 20

# What every fixture is checked on: the training text, decomposed accents that NFC composes, a Kelvin sign (NFC
# maps it to K), a combining mark right after an added token (NFC would join ">" and U+0338 into one character if it
# ran over the added token), added tokens in the text, long digit runs and contractions in capitals.
CHECK = TRAIN[:4] + [
    "Cafe\u0301 re\u0301sume\u0301 A\u030angstro\u0308m \u212a elvin",
    "<|im_start|>\u0338 user<|im_end|>\u0301 text <|endoftext|> end",
    "12345678901234567890 and 1 22 333 4444; WE'LL SEE, THEY'RE HERE, I'M OUT",
    "mixed\u00a0spaces\u2003and\u3000ideographic, éé e\u0301e\u0301, 한국어 \u1100\u1161\u11a8",
    " leading space", "", "x",
]


def _trained_ranks() -> dict[bytes, int]:
    """Ranks of a small byte-level BPE trained here, in creation order (the shape of a tiktoken rank file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    spec = json.loads(tok.to_str())
    to_byte = byte_level_alphabet()
    ranks = {bytes([b]): b for b in range(256)}
    for m in spec["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ranks.setdefault(bytes(to_byte[c] for c in a + b), len(ranks))
    return ranks


RANKS = _trained_ranks()
CHARS = {b: c for c, b in byte_level_alphabet().items()}


def _s(token: bytes) -> str:
    return "".join(CHARS[b] for b in token)


def one_merge_per_token(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Each token's merge: the two parts BPE reaches from its bytes with the lower ranks (GPT-2's merges.txt)."""
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            r, i = min(pairs)
            if r >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            out.append((parts[0], parts[1]))
    return out


def every_split(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, by the token's rank, then by the parts' ranks (how
    ``TikTokenConverter`` writes merges: several per token, the parts sometimes ranked above the token)."""
    out = []
    for token, rank in ranks.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        out += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    return [(a, b) for *_, a, b in sorted(out)]


def build(path, ranks, merges, *, ids=None, pattern=None, nfc=False, ignore_merges=False, specials_first=0,
          byte_fallback=False):
    """A tokenizer.json: ``ids`` maps each token's rank to its id (default: the rank, shifted by ``specials_first``
    special ids placed below the vocabulary as tekken does); specials otherwise follow the vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    ids = ids or {r: r + specials_first for r in ranks.values()}
    vocab = {_s(t): ids[r] for t, r in ranks.items()}
    vocab.update({s: i for i, s in enumerate(SPECIALS[:specials_first])})  # tokenizers keeps these ids
    tok = Tokenizer(BPE(vocab, [(_s(a), _s(b)) for a, b in merges], ignore_merges=ignore_merges,
                        byte_fallback=byte_fallback))
    if nfc:
        tok.normalizer = normalizers.NFC()
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    spec = json.loads(tok.to_str())
    top = max(vocab.values()) + 1
    spec["added_tokens"] = [{"id": i if specials_first else top + i, "content": s, "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False, "special": True}
                            for i, s in enumerate(SPECIALS)]
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return path


def _shuffled_ids(ranks: dict[bytes, int], seed: int = 0) -> dict[int, int]:
    """Ids that do not follow the merge order (bytes keep theirs): the rank -> id table must be used."""
    multi = sorted(r for r in ranks.values() if r >= 256)
    perm = multi[:]
    random.Random(seed).shuffle(perm)
    return {**{r: r for r in range(256)}, **dict(zip(multi, perm))}


FORMS = {
    "gpt2 (vocab.json + merges.txt)": dict(merges=one_merge_per_token),
    "gpt2 (TikTokenConverter)": dict(merges=every_split, pattern=GPT2_SPLIT_PATTERN, ignore_merges=True),
    "ids out of merge order": dict(merges=one_merge_per_token, shuffle=True),
    "several merges and ids out of order": dict(merges=every_split, ignore_merges=True, shuffle=True,
                                                pattern=GPT2_SPLIT_PATTERN),
    "llama3 pattern": dict(merges=every_split, pattern=LLAMA3, ignore_merges=True),
    "qwen (NFC)": dict(merges=one_merge_per_token, pattern=QWEN, nfc=True),
    "qwen (NFC) with ids out of order": dict(merges=one_merge_per_token, pattern=QWEN, nfc=True, shuffle=True),
    "tekken (special ids first)": dict(merges=every_split, pattern=LLAMA3, ignore_merges=True,
                                       specials_first=len(SPECIALS)),
}


def _make(tmp_path, form: str):
    kw = dict(FORMS[form])
    merges = kw.pop("merges")(RANKS)
    ids = _shuffled_ids(RANKS) if kw.pop("shuffle", False) else None
    return build(tmp_path / "tokenizer.json", RANKS, merges, ids=ids, **kw)


@pytest.mark.parametrize("form", list(FORMS))
def test_auto_takes_tiktoken_and_writes_the_same_bytes(tmp_path, form):
    path = _make(tmp_path, form)
    tok = load_tokenizer(path, "auto")
    assert tok.encoder == "tiktoken", tok.fallback
    assert tok.encode_batch(CHECK) == tok.reference_encode_batch(CHECK)
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for text in TRAIN[:4] + CHECK:
            f.write(json.dumps({"text": text}) + "\n")
    lines: list[str] = []
    out = {}
    for encoder, workers in (("tokenizers", 1), ("auto", 2)):
        prefix = tmp_path / f"{encoder}"
        preprocess([str(corpus)], str(path), str(prefix), workers=workers, append_eod=True, encoder=encoder,
                   progress=False, log=lines.append)
        out[encoder] = prefix.with_suffix(".bin").read_bytes() + prefix.with_suffix(".idx").read_bytes()
    assert out["auto"] == out["tokenizers"]
    assert lines[2].startswith("encoder: tiktoken (auto; identical to tokenizers on the first ")


def test_the_checked_table_is_cached_and_gives_the_same_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_LITE_CACHE", str(tmp_path / "cache"))
    path = _make(tmp_path, "qwen (NFC) with ids out of order")
    first = load_tokenizer(path, "auto")
    assert len(list((tmp_path / "cache" / "fast_bpe").glob("*.npz"))) == 1
    again = load_tokenizer(path, "auto")
    assert again._hf is None  # a hit needs no tokenizers load until the corpus check, which runs beside the workers
    facts = ("vocab_size", "max_token", "max_id", "eod_id", "pad_id", "sentinel_ids")
    reference = load_tokenizer(path, "tokenizers")
    assert [getattr(again, f) for f in facts] == [getattr(first, f) for f in facts] == \
        [getattr(reference, f) for f in facts]
    assert again.encoder == "tiktoken" and again.encode_batch(CHECK) == first.encode_batch(CHECK)
    assert again.encode_batch(CHECK) == again.reference_encode_batch(CHECK)
    # Given one, a hit leaves loading tokenizers to another process, which answers the first reference call (the
    # corpus check) and exits; tokenizers is never loaded here.
    beside = load_tokenizer(path, "auto", prefetch_reference(str(path), "auto"))
    assert beside._background is not None
    assert beside.reference_encode_batch(CHECK) == again.reference_encode_batch(CHECK)
    assert beside._hf is None and beside._background is None
    # A configured end-of-document name the cache did not record is looked up in tokenizers itself.
    name = reference.backend.id_to_token(300)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": name}))
    configured = load_tokenizer(tmp_path, "auto")
    assert configured.eod_id == reference.backend.token_to_id(name) and configured.encoder == "tiktoken"


def _refusal(path) -> str:
    tok = load_tokenizer(path, "auto")
    assert tok.encoder == "tokenizers"
    return tok.fallback


def test_unigram_wordpiece_and_byte_fallback_fall_back_with_their_reason(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram, WordPiece

    uni = Tokenizer(Unigram([("<unk>", 0.0), ("<|endoftext|>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -1.5)], 0))
    uni.save(str(tmp_path / "unigram.json"))
    wp = Tokenizer(WordPiece({"[UNK]": 0, "hello": 1, "##s": 2, "<|endoftext|>": 3}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.save(str(tmp_path / "wordpiece.json"))
    build(tmp_path / "fallback.json", RANKS, one_merge_per_token(RANKS), byte_fallback=True)
    prefix = "--encoder tiktoken cannot represent this tokenizer "
    assert _refusal(tmp_path / "unigram.json") == prefix + "(model type 'Unigram', expected BPE)"
    assert _refusal(tmp_path / "wordpiece.json") == prefix + "(model type 'WordPiece', expected BPE)"
    assert _refusal(tmp_path / "fallback.json") == prefix + "(byte fallback)"
    (tmp_path / "in.txt").write_text("hello hellos\n")
    lines: list[str] = []
    preprocess([str(tmp_path / "in.txt")], str(tmp_path / "wordpiece.json"), str(tmp_path / "out"), progress=False,
               log=lines.append)
    assert lines[0] == f"encoder: tokenizers (auto: {prefix}(model type 'WordPiece', expected BPE))"


def _letters(path, merges, ignore_merges=False):
    """A byte-level BPE whose merges join ASCII letters, the whole text one piece."""
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in merges:
        ranks.setdefault((a + b).encode(), len(ranks))
    return build(path, ranks, [(a.encode(), b.encode()) for a, b in merges], pattern=r"\S+|\s+",
                 ignore_merges=ignore_merges)


def test_merges_tokenizers_applies_differently_are_refused_by_name(tmp_path):
    # Merge order gives "abc" -> [a, bc]; with ignore_merges "abc" is still returned whole, but in "abcd" tokenizers
    # gives [a, bc, d] where tiktoken would join a + bc: no rank table is exact.
    path = _letters(tmp_path / "t1.json", [("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=True)
    assert _refusal(path).startswith("--encoder tiktoken cannot represent this tokenizer (token 'abc' encoded alone "
                                     "gives [")
    tok = load_tokenizer(path)
    assert tok.encode("abcd") == [tok.backend.token_to_id(t) for t in ("a", "bc", "d")]
    # A token's merges split by another token's: their order cannot be one rank per token.
    path = _letters(tmp_path / "t2.json", [("a", "b"), ("b", "c"), ("a", "bc"), ("c", "d"), ("ab", "c")])
    assert _refusal(path) == ("--encoder tiktoken cannot represent this tokenizer (merge 4 ('ab' + 'c') creates "
                              "'abc' after merges creating later tokens)")


def test_random_merge_lists_tiktoken_is_exact_wherever_it_is_taken(tmp_path):
    """Random merge lists over three letters (parts before or after their merge, several merges per token, merges
    tokenizers never applies), every string of up to 7 letters: where auto takes tiktoken, every id is the same."""
    rng = random.Random(7)
    strings = ["".join(p) for n in range(1, 8) for p in itertools.product("abc", repeat=n)]
    taken = 0
    for trial in range(24):
        tokens, merges = ["a", "b", "c"], []
        for _ in range(rng.randint(3, 12)):
            a, b = rng.choice(tokens), rng.choice(tokens)
            if len(a + b) <= 5 and (a, b) not in merges:
                merges.append((a, b))
                tokens.append(a + b) if a + b not in tokens else None
        if trial % 3 == 0:
            rng.shuffle(merges)
        path = _letters(tmp_path / f"r{trial}.json", merges, ignore_merges=trial % 2 == 0)
        tok = load_tokenizer(path, "auto")
        if tok.encoder == "tiktoken":
            taken += 1
            assert tok.encode_batch(strings) == tok.reference_encode_batch(strings), merges
    assert taken >= 8  # most random lists are exact; the test would say nothing if none were


def test_the_benchmark_rebuilds_each_published_structure_and_auto_takes_tiktoken(tmp_path):
    """``tools/bench.py data`` rebuilds the published tokenizers from rank files; here from this module's ranks."""
    import base64

    from megatron_lite.bench.data import BUILDERS

    ranks_file = tmp_path / "ranks.tiktoken"
    ranks_file.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in RANKS.items()))
    tekken = {"config": {"pattern": LLAMA3, "default_vocab_size": len(RANKS) + 5, "default_num_special_tokens": 5},
              "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": None}
                        for t, r in RANKS.items()]}
    (tmp_path / "tekken.json").write_text(json.dumps(tekken))
    for name, build in BUILDERS.items():
        out = tmp_path / name
        build(tmp_path / ("tekken.json" if name == "tekken" else "ranks.tiktoken"), out)
        tok = load_tokenizer(out, "auto")
        assert tok.encoder == "tiktoken", (name, tok.fallback)
        assert tok.encode_batch(CHECK) == tok.reference_encode_batch(CHECK), name
    assert load_tokenizer(tmp_path / "tekken").eod_id == 2  # </s>, below the vocabulary as in tekken


def test_the_background_reference_names_an_unreadable_tokenizer_file(tmp_path):
    from megatron_lite.data import DataError
    from megatron_lite.data.reference import BackgroundReference

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": [1, 2]}}')
    with pytest.raises(DataError, match=f"{bad}: unreadable tokenizer .*expected a tokenizers JSON file"):
        BackgroundReference(str(bad)).encode_batch(["text"])
