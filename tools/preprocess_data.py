#!/usr/bin/env python
"""Tokenize a corpus into PREFIX.bin / PREFIX.idx (Megatron-compatible MMIDIDX), in parallel and in bounded memory."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_lite.data.errors import run_cli
from megatron_lite.data.hf_datasets import quiet_datasets_logs
from megatron_lite.data.reference import prefetch_reference

EPILOG = """\
input formats (by extension; docs/formats.md, "Input formats", has the details):
  .jsonl .ndjson .json   one JSON object per line (or one JSON array); the document is the value of --json-key;
                         errors name the line, --skip-bad-records counts and skips bad records instead
  .parquet .csv .arrow   the column named by --json-key (csv: with a header row; arrow: IPC, as HF datasets writes)
  anything else          UTF-8 text; by default each block of lines separated by blank lines is one document
                         (--text-document block); --text-document file makes each whole file one document
  --dataset NAME         a dataset HF datasets can load (a Hub name, a local directory of data files, or a directory
                         written by save_to_disk), with --split and --json-key
  .gz on a text, JSON-lines or CSV file is decompressed on the fly

tokenizer: a tokenizers JSON file, or a directory holding tokenizer.json (train_tokenizer.py or save_pretrained
output; the eos/pad names in tokenizer_config.json are used). Slow-only tokenizers (vocab.json + merges.txt, *.model)
are refused.
The .bin dtype is uint16 when the largest token id + 1 is under 65,500, else int32.

The progress bar counts bytes of the input files (records for --dataset); a streamed dataset of unknown size shows
no ETA.
The encoder (--encoder auto, the default) is tiktoken for a byte-level BPE it represents exactly (GPT-2's, Llama 3's,
Qwen's with NFC, tekken's as tokenizer.json, and those train_tokenizer.py writes; several times faster,
docs/benchmarks.md), else tokenizers, with one line saying why (Unigram/SentencePiece, WordPiece, byte fallback, other
normalizers). Exact means: tiktoken's ranks are derived from the merge list and every token of the vocabulary is
encoded alone by both libraries when the tokenizer is first loaded (the checked table is cached under
~/.cache/megatron_lite, or MEGATRON_LITE_CACHE; empty turns the cache off); the start of the corpus (256 documents,
at most 256k characters) is then encoded both ways: a difference makes auto use tokenizers, and stops an explicit
--encoder tiktoken. PREFIX.json beside the shards records the encoder and its check, the tokenizer's sha256, the
inputs and their sizes, the counts and the command line.
The output is written under a temporary name and renamed at the end; it is byte-identical for any --workers.
Existing output is never replaced without --overwrite, and is kept if the run fails.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input")
    src.add_argument("--input", nargs="+", metavar="FILE", help="corpus files or directories, read in this order")
    src.add_argument("--dataset", metavar="NAME", help="an HF datasets name, a local directory of data files, or a save_to_disk directory, "
                          "instead of --input")
    src.add_argument("--split", default="train", help="split of --dataset (default: train)")
    src.add_argument("--json-key", default="text", help="record key / column holding the text (default: text)")
    src.add_argument("--target-key", metavar="KEY", help="also write the values of KEY to PREFIX_target.bin/.idx, "
                     "aligned document by document with PREFIX (seq2seq pairs; JSON, parquet, csv and arrow inputs)")
    src.add_argument("--text-document", choices=["block", "file"], default="block",
                     help="for plain text: a blank-line-separated block (default) or a whole file is one document")
    src.add_argument("--skip-bad-records", action="store_true",
                     help="count and skip records without the key (default: stop with an error naming file and line)")
    out = p.add_argument_group("output")
    out.add_argument("--tokenizer", required=True, help="a tokenizer.json, or an HF tokenizer directory holding one")
    out.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    out.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    out.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.bin/.idx")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1, help="tokenizer processes (default: one per available core; 1: one "
                   "process, all threads)")
    p.add_argument("--encoder", choices=["auto", "tokenizers", "tiktoken"], default="auto",
                   help="what applies the tokenizer: auto (default: tiktoken where it represents the tokenizer "
                        "exactly and agrees with tokenizers on the first documents, else tokenizers), tokenizers "
                        "(the reference), or tiktoken (stop if it disagrees)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, only the summary line")
    a = p.parse_args(argv)
    if not a.input and not a.dataset:
        p.error("one of --input or --dataset is required")
    if a.input and a.dataset:
        p.error("give --input or --dataset, not both")
    if a.workers < 1:
        p.error("--workers must be at least 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dataset:
        quiet_datasets_logs()
    common = dict(workers=a.workers, append_eod=a.append_eod, overwrite=a.overwrite, text_mode=a.text_document,
                  dataset=a.dataset, split=a.split, progress=not a.no_progress, encoder=a.encoder)
    if a.target_key:
        from megatron_lite.data.seq2seq import preprocess_pairs

        preprocess_pairs(a.input, a.tokenizer, a.output_prefix, a.json_key, a.target_key,
                         skip_bad_records=a.skip_bad_records, **common)
        return 0
    # The fast encoder's corpus check needs tokenizers loaded: that starts now, in another process, so that it runs
    # beside the pipeline's imports below instead of after them.
    reference = prefetch_reference(a.tokenizer, a.encoder)
    from megatron_lite.data.preprocess import preprocess

    preprocess(a.input, a.tokenizer, a.output_prefix, skip_bad_records=a.skip_bad_records, json_key=a.json_key,
               reference=reference, **common)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
