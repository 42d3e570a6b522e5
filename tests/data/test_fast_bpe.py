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


def _byte_level_bpe(path, merges, pattern=None, ignore_merges=False) -> None:
    """A byte-level BPE over every byte with ``merges`` (of ASCII letters) on top, EOD first."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = sorted(byte_level_alphabet(), key=lambda c: byte_level_alphabet()[c])
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(BPE(vocab, merges, ignore_merges=ignore_merges))
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))


# Merge order turns "abc" into [a, bc]: "abc" is in the vocabulary but tokenizers can never produce it.
UNREACHABLE = [("b", "c"), ("a", "b"), ("ab", "c")]


def test_a_token_tokenizers_cannot_produce_is_left_out_of_the_ranks(tmp_path) -> None:
    _byte_level_bpe(tmp_path / "tok.json", UNREACHABLE)
    reference = load_tokenizer(tmp_path / "tok.json")
    fast = load_tokenizer(tmp_path / "tok.json", "tiktoken")
    texts = ["abc", "abcabc abc", "xabcx ab bc", "aabbcc"]
    assert reference.encode("abc") == [reference.backend.token_to_id(t) for t in ("a", "bc")]
    assert fast.encode_batch(texts) == reference.reference_encode_batch(texts)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_disagreement_on_the_first_documents_stops_the_run(tmp_path, workers) -> None:
    # POSIX classes are ASCII in tiktoken's regex engine and Unicode in tokenizers': "é" splits differently.
    _byte_level_bpe(tmp_path / "tok.json", [("f", "Ã"), ("fÃ", "©")], pattern=r"[[:alpha:]]+|[^[:alpha:]]+")
    (tmp_path / "in.txt").write_text("xyz\n\ncafé café\n")
    with pytest.raises(DataError, match=r"tok\.json: --encoder tiktoken and tokenizers give different ids for "
                                         r"document 2 \('café café'\.\.\.\); use --encoder tokenizers"):
        preprocess([str(tmp_path / "in.txt")], str(tmp_path / "tok.json"), str(tmp_path / "out"),
                   encoder="tiktoken", workers=workers, **QUIET)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
    preprocess([str(tmp_path / "in.txt")], str(tmp_path / "tok.json"), str(tmp_path / "out"), **QUIET)  # the default


def test_tokenizers_tiktoken_cannot_represent_are_refused_by_name(tmp_path, tokenizer_dir) -> None:
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "lower.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"lower\.json: --encoder tiktoken cannot represent this tokenizer "
                                         r"\(normalizer 'Lowercase'; only NFC is applied exactly\); use --encoder "
                                         r"tokenizers"):
        load_tokenizer(tmp_path / "lower.json", "tiktoken")
    assert load_tokenizer(tmp_path / "lower.json", "auto").fallback == (
        "--encoder tiktoken cannot represent this tokenizer (normalizer 'Lowercase'; only NFC is applied exactly)")
    with pytest.raises(DataError, match=r"encoder 'sentencepiece': expected one of auto, tokenizers, tiktoken"):
        load_tokenizer(tokenizer_dir, "sentencepiece")


def _run(tmp_path, inputs, tokenizer, name, encoder="auto", workers=1):
    lines: list[str] = []
    prefix = tmp_path / name
    preprocess(inputs, str(tokenizer), str(prefix), workers=workers, encoder=encoder, progress=False,
               log=lines.append)
    sidecar = json.loads(prefix.with_suffix(".json").read_text())
    return lines, sidecar, prefix.with_suffix(".bin").read_bytes() + prefix.with_suffix(".idx").read_bytes()


def test_auto_is_tiktoken_where_it_is_exact_and_records_how_the_shard_was_made(tmp_path, corpus, tokenizer_dir):
    lines, sidecar, auto_bytes = _run(tmp_path, [str(corpus)], tokenizer_dir, "auto", workers=2)
    _, _, reference = _run(tmp_path, [str(corpus)], tokenizer_dir, "ref", encoder="tokenizers")
    assert auto_bytes == reference
    assert lines[0].startswith("encoder: tiktoken (auto; identical to tokenizers on the first ")
    assert lines[-1].endswith(f"tokens/s; {lines[0]}")  # the summary repeats the choice and the check
    assert sidecar["encoder"] == {"used": "tiktoken", "requested": "auto", "line": lines[0]}
    assert len(sidecar["tokenizer"]["sha256"]) == 64 and sidecar["documents"] > 0 and sidecar["tokens"] > 0
    assert sidecar["inputs"] == [{"path": str(corpus), "bytes": corpus.stat().st_size}]
    assert isinstance(sidecar["command"], list)


def test_auto_falls_back_for_a_tokenizer_tiktoken_cannot_represent(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece({"[UNK]": 0, "hello": 1, "world": 2, "<|endoftext|>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "wp.json"))
    (tmp_path / "in.txt").write_text("hello world\n\nworld hello\n")
    lines, sidecar, _ = _run(tmp_path, [str(tmp_path / "in.txt")], tmp_path / "wp.json", "out")
    assert lines[0] == "encoder: tokenizers (auto: --encoder tiktoken cannot represent this tokenizer (model type " \
                       "'WordPiece', expected BPE))"
    assert sidecar["encoder"]["used"] == "tokenizers"


def test_auto_falls_back_when_the_encoders_disagree_on_the_first_documents(tmp_path, monkeypatch):
    import megatron_lite.data.preprocess as pp

    monkeypatch.setattr(pp, "CHUNK_DOCS", 1)  # chunks already with the workers when the check fails are redone
    _byte_level_bpe(tmp_path / "tok.json", [("f", "Ã"), ("fÃ", "©")], pattern=r"[[:alpha:]]+|[^[:alpha:]]+")
    (tmp_path / "in.txt").write_text("café café\n\nxyz\n\nfé\n\nabc\n\nfé café\n\nz\n")
    lines, sidecar, auto_bytes = _run(tmp_path, [str(tmp_path / "in.txt")], tmp_path / "tok.json", "auto", workers=2)
    _, _, reference = _run(tmp_path, [str(tmp_path / "in.txt")], tmp_path / "tok.json", "ref", encoder="tokenizers")
    assert auto_bytes == reference
    assert lines[0] == "encoder: tokenizers (auto: tiktoken gave different ids for document 1 of 1 checked)"
    assert sidecar["encoder"]["used"] == "tokenizers"


def test_an_existing_sidecar_is_not_replaced_without_overwrite(tmp_path, corpus, tokenizer_dir):
    (tmp_path / "out.json").write_text("{}")
    with pytest.raises(DataError, match=r"out\.json already exists \(pass --overwrite to replace it\)"):
        preprocess([str(corpus)], str(tokenizer_dir), str(tmp_path / "out"), **QUIET)
    assert (tmp_path / "out.json").read_text() == "{}"
