#!/usr/bin/env python
"""Train a byte-level BPE tokenizer with HF tokenizers and write DIR/tokenizer.json.

Special tokens come first in the vocabulary: <|endoftext|> (end of document, id 0), <|pad|> (id 1), then the optional
sentinels <extra_id_0>.. for span corruption. The corpus is streamed, never loaded whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_lite.data.errors import DataError, run_cli
from megatron_lite.data.hf_datasets import quiet_datasets_logs
from megatron_lite.data.sources import SourceStats, iter_documents
from megatron_lite.data.tokenizer import EOD_TOKEN, PAD_TOKEN, SENTINEL_FORMAT


def train(docs, vocab_size: int, sentinels: int = 0, min_frequency: int = 2):
    """Return a trained ``tokenizers.Tokenizer``; ``docs`` is any iterator of strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [EOD_TOKEN, PAD_TOKEN] + [SENTINEL_FORMAT.format(i) for i in range(sentinels)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="FILE", help="corpus files (formats as for preprocess_data.py)")
    p.add_argument("--dataset", metavar="NAME", help="an HF datasets name or local dataset directory instead of --input")
    p.add_argument("--split", default="train")
    p.add_argument("--json-key", default="text")
    p.add_argument("--text-document", choices=["block", "file"], default="block")
    p.add_argument("--skip-bad-records", action="store_true")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--min-frequency", type=int, default=2, help="merge pairs seen at least this often (default 2)")
    p.add_argument("--sentinels", type=int, default=0, help="number of <extra_id_N> tokens for span corruption")
    p.add_argument("--output", required=True, help="directory to write tokenizer.json into")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if not a.input and not a.dataset:
        p.error("one of --input or --dataset is required")
    if a.dataset:
        quiet_datasets_logs()
    specials = 2 + a.sentinels
    if a.vocab_size < 256 + specials:
        raise DataError(f"--vocab-size {a.vocab_size} is too small (a byte-level BPE needs at least {256 + specials} "
                        f"with {specials} special tokens)")
    out = Path(a.output) / "tokenizer.json"
    if out.exists() and not a.overwrite:
        raise DataError(f"{out} already exists (pass --overwrite to replace it)")
    stats = SourceStats()
    docs = iter_documents(a.input, json_key=a.json_key, text_mode=a.text_document,
                          skip_bad_records=a.skip_bad_records, stats=stats, dataset=a.dataset, split=a.split)
    tok = train(docs, a.vocab_size, a.sentinels, a.min_frequency)
    if stats.documents == 0:
        raise DataError(f"{', '.join(a.input or [a.dataset])}: no documents found to train on")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)
    (out.parent / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN,
         "bos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}, indent=2) + "\n")
    print(f"wrote {out}: vocabulary {tok.get_vocab_size():,} from {stats.documents:,} documents"
          + (f" ({stats.skipped:,} bad records skipped)" if stats.skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
