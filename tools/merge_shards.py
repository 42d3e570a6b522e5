#!/usr/bin/env python
"""Concatenate .bin/.idx shards (same dtype) into one pair, keeping document boundaries and order."""

from __future__ import annotations

import argparse
import sys

from megatron_lite.data.errors import run_cli
from megatron_lite.data.indexed import merge_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX", help="shard prefixes, merged in this order")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    a = p.parse_args(argv)
    out = merge_shards(a.inputs, a.output_prefix, overwrite=a.overwrite)
    print(f"wrote {a.output_prefix}.bin/.idx: {len(a.inputs)} shards, {out.num_documents:,} documents, "
          f"{out.num_tokens:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
