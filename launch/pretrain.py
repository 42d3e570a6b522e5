"""Pretraining entry point for deepspeed, torchrun or plain python.

    python launch/pretrain.py --config configs/quickstart.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/quickstart.yaml parallel.engine=fsdp parallel.zero_stage=0
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/quickstart.yaml parallel.engine=deepspeed

Exit status: 0 when training finished or was stopped by SIGTERM/SIGINT after a checkpoint; 2 for a bad config, bad
data or an unreadable checkpoint, and 1 when training cannot go on (non-finite steps, a failed checkpoint write), each
with one line on stderr (``--debug`` adds the traceback). Another live run on the same directory is refused (2).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def should_report(error: Exception) -> bool:
    """Whether this rank prints ``error``: every rank fails the same way, so N ranks would print N copies.

    A config error is the same everywhere (every rank reads the same config), and so are a checkpoint's contents
    (one shared directory) and the decisions all ranks take together (non-finite steps): rank 0 alone reports them.
    Data errors can depend on a node's own disk, so the first rank of each node reports those; a rank that failed to
    write its own part of a checkpoint reports that itself.
    """
    from megatron_lite.errors import CheckpointError, CheckpointWriteError, ConfigError, NonFiniteError

    if int(os.environ.get("RANK", "0")) == 0:
        return True
    if isinstance(error, CheckpointWriteError):
        return "another rank failed" not in str(error)
    if isinstance(error, (ConfigError, CheckpointError, NonFiniteError)):
        return False
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (may name a 'base:' to inherit from)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error, not only its line")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.micro_batch_size=4")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from megatron_lite.config import load_config
    from megatron_lite.errors import exit_status, first_line

    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_lite.rules import check_run_settings
        from megatron_lite.training.preflight import check_data_files, check_data_fits_model

        check_run_settings(cfg)  # what needs no torch fails first, in a fraction of a second
        check_data_fits_model(cfg)
        check_data_files(cfg)
        from megatron_lite.training.trainer import train  # torch loads only for a valid config

        train(cfg)
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        if should_report(e):
            if args.debug:
                traceback.print_exc()
            print(f"error: {first_line(e)}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print("error: interrupted (a second Ctrl-C); the last checkpoint is kept", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # a config error exits before torch is ever imported
            import gc

            import torch.distributed as dist

            # The engine's reference cycles (hooks, FSDP and DeepSpeed state) may hold gloo work objects with tensors;
            # freed during interpreter shutdown they need a GIL that is gone, and the process aborts after a finished
            # run. Free them now, while the interpreter is whole, then tear the groups down.
            gc.collect()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
