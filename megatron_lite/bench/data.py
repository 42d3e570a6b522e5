"""``tools/bench.py data``: the preprocessing command's whole-process time against a ``datasets.map`` baseline's, per
tokenizer, beside the tokenizer-only ceiling; then the reader and loader throughput.

Whole process means what a user waits for: each side runs as its own ``python`` process, timed from start to exit, so
imports, loading the tokenizer and reading the corpus count. The two sides alternate trial by trial and the best of
each is kept, so that load from other work on the machine hits both alike; the load average is printed before and
after. The ceiling is tiktoken's ``encode_ordinary_batch`` on every core over the corpus already in memory, with the
encoding preprocessing uses: how fast the tokenizer alone can go.

Tokenizers: one trained on the corpus by ``train_tokenizer.py``'s trainer, and published byte-level BPEs rebuilt
offline from rank files that packages on the registry ship (nothing here downloads anything): GPT-2's ``gpt2.tiktoken``
(``openai-whisper``), Llama 3's ``tokenizer.model`` (``llama-models``), Qwen's ``qwen.tiktoken`` (``dashscope``) and
Mistral's ``tekken.json`` (``mistral-common``). Each becomes the ``tokenizer.json`` structure Hugging Face publishes
for it, since that structure, not the ranks, decides which encoder preprocessing can use:

- ``gpt2``: the original ``vocab.json`` + ``merges.txt`` (one merge per token), converted by ``transformers``;
- ``gpt2-tiktoken``: what ``transformers``' ``TikTokenConverter`` writes from the rank file (every split of every token
  is a merge, several per token, and ``ignore_merges``);
- ``llama3``: the same converter with Llama 3's split pattern and its 256 special tokens;
- ``qwen``: one merge per token, an NFC normalizer and Qwen's split pattern, as Qwen2's ``tokenizer.json``;
- ``tekken``: Mistral's tekken ranks after its 1,000 special ids, merges from the same converter.

Corpus: ``--prose DIR`` takes every ``.txt``/``.rst`` file under DIR as one document (Python's reST documentation,
``apt-get download python3.11-doc``, is ~11 MB of English prose); without it, the standard library's docstrings.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from megatron_lite.data.fast_bpe import GPT2_SPLIT_PATTERN, byte_level_alphabet

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0-2; the rest of the special range is filled with placeholders

_TO_CHAR = {b: c for c, b in byte_level_alphabet().items()}


def _chars(token: bytes) -> str:
    """A token's bytes in the byte-level alphabet that ``tokenizer.json`` files use."""
    return "".join(_TO_CHAR[b] for b in token)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file (``base64-token rank`` per line), as Llama 3's ``tokenizer.model`` also is."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:40]!r}") from None
    return ranks


def read_tekken(path: Path) -> tuple[dict[bytes, int], str, int]:
    """Ranks, split pattern and number of special ids of a Mistral ``tekken.json`` (the first ``vocab_size -
    special`` ranks are the ones in use)."""
    spec = json.loads(path.read_text())
    config = spec["config"]
    n_special = config.get("default_num_special_tokens", 1000)
    inner = config.get("default_vocab_size", len(spec["vocab"]) + n_special) - n_special
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in spec["vocab"][:inner]}
    return ranks, config["pattern"], n_special


def one_merge_per_token(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each token, in rank order: the two parts that BPE with only the lower-ranked tokens
    reaches (how GPT-2's ``merges.txt`` and Qwen2's merges relate to their ranks). Tokens that the lower ranks cannot
    reach get no merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str, specials: dict[str, int],
                   nfc: bool = False, ignore_merges: bool = False):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in sorted(specials, key=specials.get)])
    got = {c: tok.token_to_id(c) for c in specials}
    if got != specials:
        raise ValueError(f"special tokens took ids {got}, expected {specials}")
    return tok


def _converter_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges as ``transformers``' ``TikTokenConverter`` derives them from a rank file."""
    import tempfile

    from transformers.convert_slow_tokenizer import TikTokenConverter

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local file; keep no copy of it
    with tempfile.NamedTemporaryFile("wb", suffix=".tiktoken", delete=False) as f:
        for token, rank in ranks.items():
            f.write(base64.b64encode(token) + b" %d\n" % rank)
    try:
        return TikTokenConverter(f.name).extract_vocab_merges_from_model(f.name)
    finally:
        os.unlink(f.name)


def build_gpt2(src: Path, out: Path) -> None:
    """GPT-2 as its original ``vocab.json`` + ``merges.txt``, converted by ``transformers`` to ``tokenizer.json``."""
    from transformers import GPT2TokenizerFast

    ranks = read_tiktoken_ranks(src)
    slow = out.parent / f"{out.name}-slow"
    slow.mkdir(parents=True, exist_ok=True)
    vocab = {_chars(t): r for t, r in ranks.items()}
    vocab["<|endoftext|>"] = len(ranks)
    (slow / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{_chars(a)} {_chars(b)}" for a, b in one_merge_per_token(ranks)]
    (slow / "merges.txt").write_text("\n".join(lines) + "\n")
    GPT2TokenizerFast(vocab=str(slow / "vocab.json"), merges=str(slow / "merges.txt")).save_pretrained(str(out))


def build_tiktoken_converted(src: Path, out: Path, pattern: str, specials: list[str]) -> None:
    """A rank file as ``TikTokenConverter`` writes it (every split a merge, ``ignore_merges``), specials after it."""
    ranks = read_tiktoken_ranks(src)
    vocab, merges = _converter_vocab_merges(ranks)
    extra = {s: len(ranks) + i for i, s in enumerate(specials)}
    _bpe_tokenizer(vocab, merges, pattern, extra, ignore_merges=True).save(str(_mkdir(out) / "tokenizer.json"))


def build_qwen(src: Path, out: Path) -> None:
    """Qwen's ranks as Qwen2's ``tokenizer.json``: one merge per token, NFC, Qwen's split pattern."""
    ranks = read_tiktoken_ranks(src)
    vocab = {_chars(t): r for t, r in ranks.items()}
    merges = [(_chars(a), _chars(b)) for a, b in one_merge_per_token(ranks)]
    extra = {s: len(ranks) + i for i, s in enumerate(QWEN_SPECIALS)}
    _bpe_tokenizer(vocab, merges, QWEN_PATTERN, extra, nfc=True).save(str(_mkdir(out) / "tokenizer.json"))


def build_tekken(src: Path, out: Path) -> None:
    """Mistral's ``tekken.json``: special ids first, the ranks after them, merges as the converter derives them."""
    ranks, pattern, n_special = read_tekken(src)
    vocab, merges = _converter_vocab_merges(ranks)
    vocab = {t: i + n_special for t, i in vocab.items()}
    specials = TEKKEN_SPECIALS + [f"<SPECIAL_{i}>" for i in range(len(TEKKEN_SPECIALS), n_special)]
    vocab.update({s: i for i, s in enumerate(specials)})  # in the vocabulary too, so they keep these low ids
    tok = _bpe_tokenizer(vocab, merges, pattern, {s: i for i, s in enumerate(specials)}, ignore_merges=True)
    tok.save(str(_mkdir(out) / "tokenizer.json"))


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "gpt2": build_gpt2,
    "gpt2-tiktoken": lambda src, out: build_tiktoken_converted(src, out, GPT2_SPLIT_PATTERN, ["<|endoftext|>"]),
    "llama3": lambda src, out: build_tiktoken_converted(
        src, out, LLAMA3_PATTERN,
        LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]),
    "qwen": build_qwen,
    "tekken": build_tekken,
}

SOURCES = {"gpt2": "gpt2", "gpt2-tiktoken": "gpt2", "llama3": "llama3", "qwen": "qwen", "tekken": "tekken"}


def stdlib_docstrings(limit_chars: int | None = None, per_module: bool = False) -> list[str]:
    """Every docstring of the standard library's modules, found with ``ast``: ~1.8M characters of real prose.

    ``per_module``: one long document per module (its docstrings joined by blank lines), ~2k documents of up to
    ~100k characters, the shape of books rather than of web snippets."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        module: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 20:
                    module.append(d)
                    total += len(d)
        if per_module and module:
            docs.append("\n\n".join(module))
        elif not per_module:
            docs.extend(module)
        if limit_chars and total >= limit_chars:
            return docs
    return docs


def prose_documents(root: Path) -> list[str]:
    """Every ``.txt`` / ``.rst`` file under ``root`` as one document, in path order."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".rst"))
    if not files:
        raise SystemExit(f"error: {root}: no .txt or .rst files (expected an unpacked python3.11-doc or similar)")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def baseline_map(jsonl: Path, tokenizer_file: Path, num_proc: int) -> int:
    """``datasets.map`` with a fast tokenizer, batched, on every core: the plain way to do it. Returns the tokens."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    with tempfile.TemporaryDirectory(dir=jsonl.parent) as cache:  # a cold cache each time: nothing reused
        ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=cache)
        out = ds.map(lambda b: {"ids": tok(b["text"])["input_ids"]}, batched=True, batch_size=1000,
                     remove_columns=["text"], num_proc=num_proc, load_from_cache_file=False)
        return sum(len(x) for x in out["ids"])


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds of a whole process, start to exit, and what it printed; a failure stops the benchmark."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return seconds, proc.stdout


def _preprocess_cmd(jsonl: Path, tok: Path, prefix: Path, encoder: str | None = None) -> list[str]:
    tool = Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py"
    cmd = [sys.executable, str(tool), "--input", str(jsonl), "--tokenizer", str(tok), "--output-prefix", str(prefix),
           "--append-eod", "--overwrite", "--no-progress"]
    return cmd + (["--encoder", encoder] if encoder else [])


def ceiling(enc, texts: list[str]) -> tuple[int, float]:
    """Tokens and seconds of tiktoken's ``encode_ordinary_batch`` on every core over ``texts`` already in memory."""
    t0 = time.perf_counter()
    ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    return sum(map(len, ids)), time.perf_counter() - t0


# The tokenizer alone as a whole process: what a user's own script would do with tiktoken and a rank file.
TIKTOKEN_SCRIPT = """
import json, os, sys, tiktoken
from tiktoken.load import load_tiktoken_bpe
ranks, pattern, corpus = sys.argv[1:4]
enc = tiktoken.Encoding("bench", pat_str=open(pattern).read(), mergeable_ranks=load_tiktoken_bpe(ranks),
                        special_tokens={})
texts = [json.loads(line)["text"] for line in open(corpus)]
print("tokens", sum(map(len, enc.encode_ordinary_batch(texts, num_threads=os.cpu_count()))))
"""


def _write_rank_file(enc, out: Path) -> tuple[Path, Path]:
    """The encoding's ranks as a tiktoken rank file, and its split pattern, for :data:`TIKTOKEN_SCRIPT`."""
    ranks, pattern = out / "ranks.tiktoken", out / "pattern.txt"
    with open(ranks, "wb") as f:
        for token, rank in enc._mergeable_ranks.items():
            f.write(base64.b64encode(token) + b" %d\n" % rank)
    pattern.write_text(enc._pat_str)
    return ranks, pattern


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def compare_whole_process(name: str, tok_dir: Path, jsonl: Path, texts: list[str], work: Path,
                          trials: int) -> dict:
    """One table row. The default command, the baseline and tiktoken alone (a whole-process script, and in memory)
    take turns in each trial, the order rotating; the best of ``trials`` of each is kept. The first run of ours, with
    an empty cache (every token checked), and one run with ``--encoder tokenizers`` (the bytes must match) come
    first and are reported on their own."""
    from megatron_lite.data import DataError, load_tokenizer

    out = work / "shards" / name
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="fast-bpe-cache-", dir=work)
    env = {"MEGATRON_LITE_CACHE": cache, "HF_DATASETS_OFFLINE": "1", "TIKTOKEN_CACHE_DIR": ""}
    first, log = _timed(_preprocess_cmd(jsonl, tok_dir, out / "auto"), env)
    line = next((x for x in log.splitlines() if x.startswith("encoder: ")), "encoder: ?")
    ref_s, _ = _timed(_preprocess_cmd(jsonl, tok_dir, out / "tokenizers", "tokenizers"), env)
    same = all((out / f"auto{ext}").read_bytes() == (out / f"tokenizers{ext}").read_bytes() for ext in (".bin", ".idx"))
    os.environ["MEGATRON_LITE_CACHE"] = cache  # holds this tokenizer's checked table by now
    try:
        enc = load_tokenizer(tok_dir, "tiktoken")._fast.encoding
    except DataError:
        enc = None
    sides: dict[str, list[str] | None] = {
        "ours": _preprocess_cmd(jsonl, tok_dir, out / "auto"),
        "baseline": [sys.executable, "-m", "megatron_lite.bench.data", "baseline", str(jsonl),
                     str(tok_dir / "tokenizer.json")],
        "tiktoken script": [sys.executable, "-c", TIKTOKEN_SCRIPT, *map(str, _write_rank_file(enc, out)), str(jsonl)]
        if enc is not None else None,
        "tiktoken in memory": [] if enc is not None else None,
    }
    runs: dict[str, list[float]] = {k: [] for k, v in sides.items() if v is not None}
    counts: dict[str, int] = {}
    order = list(runs)
    for trial in range(trials):
        for side in order[trial % len(order):] + order[:trial % len(order)]:
            if side == "tiktoken in memory":
                counts[side], seconds = ceiling(enc, texts)
            else:
                seconds, printed = _timed(sides[side], env)
                if side != "ours":
                    counts[side] = int(printed.split()[-1])
            runs[side].append(seconds)
    meta = json.loads((out / "auto.json").read_text())
    row = {"tokenizer": name, "encoder": line[len("encoder: "):], "documents": meta["documents"],
           "tokens": meta["tokens"], "counts": counts, "runs": runs, "best": {k: min(v) for k, v in runs.items()},
           "first_run_s": first, "tokenizers_encoder_s": ref_s, "identical": same}
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| tokenizer | encoder (auto) | tokens | ours | baseline | speed-up | tiktoken alone: script / in memory "
          "| share reached: of script / of in memory | first run (empty cache) | --encoder tokenizers | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["best"]
        ours = b["ours"]
        if "tiktoken script" in b:
            ceil = f"{b['tiktoken script']:.2f} s / {b['tiktoken in memory']:.2f} s"
            share = f"{b['tiktoken script'] / ours:.0%} / {b['tiktoken in memory'] / ours:.0%}"
        else:
            ceil = share = "n/a"
        print(f"| {r['tokenizer']} | {r['encoder']} | {r['tokens']:,} | {ours:.2f} s, "
              f"{r['tokens'] / ours / 1e6:.2f}M tok/s | {b['baseline']:.2f} s | {b['baseline'] / ours:.2f}x | "
              f"{ceil} | {share} | {r['first_run_s']:.2f} s | {r['tokenizers_encoder_s']:.2f} s | "
              f"{r['identical']} |")


def run(a: argparse.Namespace) -> int:
    """``tools/bench.py data``: build the corpus and tokenizers, print one row per tokenizer, then reading."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from train_tokenizer import train

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    jsonl = work / "corpus.jsonl"
    t = time.perf_counter()
    if a.prose:
        docs, kind = prose_documents(Path(a.prose)) * a.repeat, f"files under {a.prose}"
    else:
        docs = stdlib_docstrings(per_module=a.long_documents) * a.repeat
        kind = "modules' docstrings (one document per module)" if a.long_documents else "stdlib docstrings"
    with open(jsonl, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    chars = sum(map(len, docs))
    print(f"corpus: {len(docs):,} documents ({kind}) x{a.repeat}, {chars / 1e6:.2f}M characters, "
          f"{jsonl.stat().st_size / 1e6:.1f} MB of JSON lines ({time.perf_counter() - t:.1f} s to collect)")
    tokenizers: dict[str, Path] = {}
    if a.vocab_size:
        trained = work / "tokenizers" / "trained"
        if not (trained / "tokenizer.json").exists():
            t = time.perf_counter()
            tok = train(iter(docs), a.vocab_size)
            trained.mkdir(parents=True, exist_ok=True)
            tok.save(str(trained / "tokenizer.json"))
            print(f"tokenizer 'trained': byte-level BPE, vocabulary {a.vocab_size:,}, trained in "
                  f"{time.perf_counter() - t:.1f} s")
        tokenizers["trained"] = trained
    for name, source in SOURCES.items():
        src = getattr(a, source)
        if not src:
            continue
        out = work / "tokenizers" / name
        if not (out / "tokenizer.json").exists():
            t = time.perf_counter()
            BUILDERS[name](Path(src), out)
            print(f"tokenizer '{name}': built from {src} in {time.perf_counter() - t:.1f} s")
        tokenizers[name] = out
    if a.only:
        tokenizers = {k: v for k, v in tokenizers.items() if k in a.only}
    print(f"load average before: {_load()}")
    rows = [compare_whole_process(name, path, jsonl, docs, work, a.trials) for name, path in tokenizers.items()]
    print(f"load average after: {_load()}")
    print_table(rows)
    if a.loader and "trained" in tokenizers:
        measure_reading(work / "shards" / "trained" / "auto", work, a)
    return 0 if all(r["identical"] for r in rows) else 1


def measure_reading(prefix: Path, work: Path, a: argparse.Namespace) -> None:
    """Open, index-build, reader and loader throughput on one shard."""
    from megatron_lite.config import DataConfig
    from megatron_lite.data import GlobalBatchLoader, IndexedDataset, build_datasets

    t = time.perf_counter()
    for _ in range(100):
        IndexedDataset(prefix)
    print(f"open .bin/.idx: {(time.perf_counter() - t) * 10:.2f} ms")
    cfg = DataConfig(prefixes=str(prefix), split="100,0,0", seq_len=a.seq_len, seed=1,
                     reset_at_document=a.reset_at_document, cache_dir=str(work / "cache"), prefetch=2)
    n_samples = a.steps * a.global_batch
    t = time.perf_counter()
    ds = build_datasets(cfg, {"train": n_samples}, log=lambda s: None)["train"]
    print(f"index build (first use, {n_samples:,} samples over {ds.epochs} epochs): {time.perf_counter() - t:.2f} s")
    n = min(len(ds), 20000)
    t = time.perf_counter()
    for i in range(n):
        ds[i]
    dt = time.perf_counter() - t
    print(f"reader: {n / dt:,.0f} samples/s, {n * a.seq_len / dt / 1e6:.2f}M tokens/s (seq_len {a.seq_len})")
    for prefetch in (0, 2):
        loader = GlobalBatchLoader(ds, a.global_batch, a.micro_batch, 0, 1, prefetch=prefetch)
        t = time.perf_counter()
        steps = sum(1 for _ in loader)
        dt = time.perf_counter() - t
        print(f"loader (global batch {a.global_batch}, micro {a.micro_batch}, prefetch {prefetch}): "
              f"{steps * a.global_batch / dt:,.0f} samples/s, {steps * a.global_batch * a.seq_len / dt / 1e6:.2f}M "
              f"tokens/s, {dt / steps * 1e3:.1f} ms per global batch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="keep the corpus, tokenizers and shards here (default: a temporary directory)")
    p.add_argument("--prose", metavar="DIR", help="corpus: every .txt/.rst file under DIR, one document each "
                   "(default: the standard library's docstrings)")
    p.add_argument("--repeat", type=int, default=1, help="repeat the corpus this many times")
    p.add_argument("--long-documents", action="store_true", help="docstrings: one document per module")
    p.add_argument("--vocab-size", type=int, default=32000, help="the tokenizer trained on the corpus (0: none)")
    p.add_argument("--gpt2", metavar="FILE", help="GPT-2's gpt2.tiktoken (openai-whisper's assets): rows gpt2 and "
                   "gpt2-tiktoken")
    p.add_argument("--llama3", metavar="FILE", help="Llama 3's tokenizer.model (llama-models)")
    p.add_argument("--qwen", metavar="FILE", help="Qwen's qwen.tiktoken (dashscope)")
    p.add_argument("--tekken", metavar="FILE", help="Mistral's tekken.json (mistral-common)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="measure only these tokenizers")
    p.add_argument("--trials", type=int, default=3, help="whole-process runs of each side, alternating; the best "
                   "of each is shown")
    p.add_argument("--no-loader", dest="loader", action="store_false", help="skip the reader/loader measurements")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--reset-at-document", action="store_true")


if __name__ == "__main__":  # the baseline's own process: python -m megatron_lite.bench.data baseline JSONL FILE
    if sys.argv[1:2] != ["baseline"] or len(sys.argv) != 4:
        raise SystemExit("usage: python -m megatron_lite.bench.data baseline CORPUS.jsonl TOKENIZER.json")
    print("tokens", baseline_map(Path(sys.argv[2]), Path(sys.argv[3]), os.cpu_count() or 1))
