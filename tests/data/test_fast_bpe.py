"""``--encoder tiktoken``: the same bytes as tokenizers where it applies, a clear refusal where it does not."""

from __future__ import annotations

import json

import pytest

from megatron_lite.data import DataError, load_tokenizer
from megatron_lite.data.fast_bpe import byte_level_alphabet
from megatron_lite.data.preprocess import preprocess

pytest.importorskip("tiktoken")

QUIET = {"progress": False, "log": lambda _: None}


def test_tiktoken_writes_the_same_bytes_as_tokenizers(tmp_path, corpus, tokenizer_dir) -> None:
    with open(corpus, "a") as f:  # unicode, digits, runs of spaces, and a special token written in the text
        f.write(json.dumps({"text": "Ünïcödé 12345  tabs\tand   spaces <|endoftext|> end — ok 日本語"}) + "\n")
    outputs = {}
    for encoder in ("tokenizers", "tiktoken"):
        for workers in (1, 2):
            prefix = tmp_path / f"{encoder}-{workers}"
            preprocess([str(corpus)], str(tokenizer_dir), str(prefix), workers=workers, append_eod=True,
                       encoder=encoder, **QUIET)
            outputs[encoder, workers] = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())
    assert len(set(outputs.values())) == 1
    tok = load_tokenizer(tokenizer_dir, "tiktoken")
    assert tok.encode_batch(["a <|endoftext|> b"])[0].count(tok.eod_id) == 1  # special tokens in text, as tokenizers


def disagreeing_tokenizer(path) -> None:
    """A byte-level BPE whose merges are ("b","c"), ("a","b"), ("ab","c"): merge order turns "abc" into [a, bc],
    while joining the lowest-id pair (tiktoken) gives [abc]."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = sorted(byte_level_alphabet(), key=lambda c: byte_level_alphabet()[c])
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for token in ("bc", "ab", "abc"):
        vocab[token] = len(vocab)
    tok = Tokenizer(BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))


def test_a_disagreement_on_the_first_documents_stops_the_run(tmp_path) -> None:
    disagreeing_tokenizer(tmp_path / "tok.json")
    reference = load_tokenizer(tmp_path / "tok.json")
    assert reference.encode("abc") == [reference.backend.token_to_id(t) for t in ("a", "bc")]
    assert load_tokenizer(tmp_path / "tok.json", "tiktoken").encode_batch(["abc"]) == [[259]]
    (tmp_path / "in.txt").write_text("xyz\n\nabc abc\n")
    with pytest.raises(DataError, match=r"tok\.json: --encoder tiktoken and tokenizers give different ids for "
                                         r"document 2 \('abc abc'\.\.\.\); use --encoder tokenizers"):
        preprocess([str(tmp_path / "in.txt")], str(tmp_path / "tok.json"), str(tmp_path / "out"),
                   encoder="tiktoken", **QUIET)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
    preprocess([str(tmp_path / "in.txt")], str(tmp_path / "tok.json"), str(tmp_path / "out"), **QUIET)  # the default


def test_tokenizers_tiktoken_cannot_represent_are_refused_by_name(tmp_path, tokenizer_dir) -> None:
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "lower.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"lower\.json: --encoder tiktoken cannot represent this tokenizer "
                                         r"\(a normalizer\); use --encoder tokenizers"):
        load_tokenizer(tmp_path / "lower.json", "tiktoken")
    with pytest.raises(DataError, match=r"encoder 'sentencepiece': expected one of tokenizers, tiktoken"):
        load_tokenizer(tokenizer_dir, "sentencepiece")
