#!/usr/bin/env python
"""Convert checkpoints between megatron_lite, Hugging Face and DeepSpeed, or show what one holds.

  --input CKPT --to hf --output DIR            our checkpoint -> an HF model directory (+ tokenizer files)
  --from hf DIR --output CKPT                  an HF model directory -> our checkpoint (weights only)
  --from deepspeed DIR --config C --output CKPT  DeepSpeed's own save_checkpoint (ZeRO 1-3) -> ours (weights + AdamW)
  --input CKPT --inspect                       step, layout, samples consumed, model config, every tensor
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from megatron_lite.convert.errors import ConvertError
from megatron_lite.convert.streaming import atomic_output_dir, check_output, human_bytes, peak_rss_bytes
from megatron_lite.errors import exit_status, first_line

EPILOG = """\
CKPT is a step directory (runs/x/checkpoints/step_00000100) or a checkpoint root with a 'latest' pointer.
Tensors are converted one at a time: peak memory stays near the largest tensor (it is printed at the end).
The output is written under a temporary name and renamed when complete; existing output is replaced only with
--overwrite. Bad input stops with one line naming the file, tensor or key, and exit status 2.

--to hf: the tokenizer comes from --tokenizer, else from data.tokenizer in the checkpoint's config.yaml; its
end-of-document and pad tokens give eos_token_id and pad_token_id (and bos_token_id, unless its tokenizer_config.json
names a bos_token). A config Hugging Face cannot express is refused, naming the option.
--from deepspeed: files are read with torch.load(weights_only=True); DeepSpeed's own small records (its ZeRO stage
enum, loss scaler, fragment addresses) are read as plain values. A file that needs other pickled objects is refused
unless --trust-pickle is given, which runs the pickle code in it: only for files you trust.
"""

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * SIZE_UNITS[unit])
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"size {text!r}: expected a number with a unit, e.g. 5GB or 500MiB")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, metavar="CKPT", help="our checkpoint (for --to and --inspect)")
    p.add_argument("--to", choices=["hf"], help="write --input as this format")
    p.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "DIR"),
                   help="import DIR of FORMAT (hf or deepspeed) as our checkpoint")
    p.add_argument("--inspect", action="store_true", help="print what --input holds")
    p.add_argument("--output", type=Path, help="the directory to write")
    p.add_argument("--config", type=Path, help="--from deepspeed: the run's config file (its model section)")
    p.add_argument("--tag", help="--from deepspeed: the checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--trust-pickle", action="store_true", help="--from deepspeed: allow pickled objects (runs code)")
    p.add_argument("--tokenizer", help="--to hf: a tokenizer.json or HF tokenizer directory (default: the config's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="--to hf: weight dtype (default: as stored, fp32)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="--to hf: split files above this (5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    modes = [m for m in (a.to, a.source, a.inspect or None) if m]
    if len(modes) != 1:
        p.error("give exactly one of --to, --from or --inspect")
    if (a.to or a.inspect) and a.input is None:
        p.error("--to and --inspect need --input")
    if (a.to or a.source) and a.output is None:
        p.error("--to and --from need --output")
    if a.source and a.source[0] not in ("hf", "deepspeed"):
        p.error(f"--from {a.source[0]}: expected hf or deepspeed")
    if a.source and a.source[0] == "deepspeed" and a.config is None:
        p.error("--from deepspeed needs --config (the run's config file, for the model's shape)")
    return a


def _tokenizer_for(a: argparse.Namespace, config) -> str | None:
    if a.tokenizer:
        return a.tokenizer
    path = config.data.tokenizer
    if path and not Path(path).exists():
        raise ConvertError(f"the checkpoint's config names data.tokenizer={path}, which does not exist here; "
                           "give it with --tokenizer")
    return path


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    progress = not a.no_progress
    if a.inspect:
        from megatron_lite.convert.inspect import inspect_checkpoint

        inspect_checkpoint(a.input)
        return 0
    check_output(a.output, a.overwrite)  # before any work
    if a.to == "hf":
        from megatron_lite.convert.checkpoint_io import read_config, resolve_checkpoint
        from megatron_lite.convert.hf_dir import export_hf

        ckpt = resolve_checkpoint(a.input)
        config = read_config(ckpt)
        tokenizer = _tokenizer_for(a, config)
        with atomic_output_dir(a.output, a.overwrite) as tmp:
            done = export_hf(ckpt, tmp, config, tokenizer, DTYPES.get(a.dtype), a.max_shard_size, progress)
        what = f"Hugging Face {config.model.family} model from {ckpt}"
    elif a.source[0] == "hf":
        from megatron_lite.convert.hf_dir import import_hf

        with atomic_output_dir(a.output, a.overwrite) as tmp:
            _, done = import_hf(Path(a.source[1]), tmp, progress)
        what = f"weights-only checkpoint from {a.source[1]}"
    else:
        from megatron_lite.convert.checkpoint_io import read_config
        from megatron_lite.convert.deepspeed_native import import_deepspeed

        config = read_config(a.config)
        with atomic_output_dir(a.output, a.overwrite) as tmp:
            done = import_deepspeed(Path(a.source[1]), tmp, config, tag=a.tag, trust_pickle=a.trust_pickle,
                                    progress=progress)
        what = f"checkpoint from DeepSpeed {a.source[1]}"
    print(f"wrote {a.output}: {what}; {done.tensors} tensors, {human_bytes(done.nbytes)} in {len(done.files)} file(s), "
          f"{time.perf_counter() - t0:.1f} s; peak RSS {human_bytes(peak_rss_bytes())}")
    return 0


def run(argv=None) -> int:
    """``main`` with bad input as one line on stderr and exit status 2 (``errors.exit_status``), no traceback."""
    try:
        return main(argv)
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
