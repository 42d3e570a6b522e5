"""Pretraining entry point for deepspeed, torchrun or plain python.

    python launch/pretrain.py --config configs/quickstart.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/quickstart.yaml parallel.engine=fsdp parallel.zero_stage=0
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/quickstart.yaml parallel.engine=deepspeed
"""

from __future__ import annotations

import argparse
import os
import sys


def should_report(error: Exception) -> bool:
    """Whether this rank prints ``error``: every rank fails the same way, so N ranks would print N copies.

    A config error is the same everywhere (every rank reads the same config): rank 0 alone reports it. Data and
    checkpoint-directory errors can depend on a node's own disk, so the first rank of each node reports those.
    """
    from megatron_lite.config import ConfigError

    if int(os.environ.get("RANK", "0")) == 0:
        return True
    return not isinstance(error, ConfigError) and int(os.environ.get("LOCAL_RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (may name a 'base:' to inherit from)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.micro_batch_size=4")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from megatron_lite.config import ConfigError, load_config
    from megatron_lite.data import DataError
    from megatron_lite.training.trainer import train

    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, DataError, FileExistsError) as e:
        if should_report(e):
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
