"""Pretraining entry point for deepspeed, torchrun or plain python.

    python launch/pretrain.py --config configs/quickstart.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/quickstart.yaml parallel.engine=fsdp parallel.zero_stage=0
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/quickstart.yaml parallel.engine=deepspeed
    python launch/pretrain.py --config configs/llama-8b.yaml --dry-run --world 512 parallel.tp=8 parallel.pp=4

Exit status: 0 when training finished or was stopped by SIGTERM/SIGINT after a checkpoint; 2 for a bad config, bad
data or an unreadable checkpoint, and 1 when training cannot go on (non-finite steps, a failed checkpoint write), each
with one line on stderr (``--debug`` adds the traceback). Another live run on the same directory is refused (2).

``--dry-run --world N`` trains nothing: in this one process it checks the layout with training's rules at N ranks,
builds each class of rank as training would on the meta device, traces a step of the most loaded one and prints the
bytes per rank beside the planner's; exit 0 when it fits ``--gpu``, 2 when a rule refuses the layout, 3 when the most
loaded rank does not fit.
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
    parser.add_argument("--dry-run", action="store_true", help="check and measure the layout at --world ranks, train nothing")
    parser.add_argument("--world", type=int, default=None, help="with --dry-run: the number of ranks to simulate")
    parser.add_argument("--dry-run-ranks", default="classes",
                        help="with --dry-run: 'classes' (one rank per class, the default), 'all', or a list 0,5,17")
    parser.add_argument("--gpu", default="h100", help="with --dry-run: the device whose memory the ranks must fit")
    parser.add_argument("--no-trace", action="store_true", help="with --dry-run: count only, trace no step")
    parser.add_argument("--json", default=None, help="with --dry-run: also write the report as JSON here")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.micro_batch_size=4")
    args = parser.parse_intermixed_args(argv)  # flags may follow the dotted overrides
    if args.dry_run:
        return dry_run_main(args)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from megatron_lite.config import load_config
    from megatron_lite.errors import exit_status, first_line

    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_lite.rules import check_layout, check_run_settings
        from megatron_lite.training.preflight import check_data_files, check_data_fits_model

        check_run_settings(cfg)  # what needs no torch fails first, in a fraction of a second
        # the layout at the launched world size too (the launchers set WORLD_SIZE); the device is known from the
        # config or, for "auto", once torch is imported, and training checks the layout again with it
        device = cfg.training.device if cfg.training.device != "auto" else None
        check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")), device)
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


def dry_run_main(args: argparse.Namespace) -> int:
    """``--dry-run``: 0 when the most loaded rank fits, 2 when the layout is refused (the line a launch prints), 3
    when it does not fit."""
    from megatron_lite.config import load_config
    from megatron_lite.errors import exit_status, first_line

    if not args.world or args.world < 1:
        print("error: --dry-run needs --world N, the number of ranks the run will have", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        ranks = args.dry_run_ranks
        if ranks not in ("classes", "all"):
            try:
                ranks = [int(r) for r in ranks.split(",")]
            except ValueError:
                print(f"error: --dry-run-ranks {ranks}: expected classes, all or a list such as 0,5,17",
                      file=sys.stderr)
                return 2
        from megatron_lite.dryrun import dry_run, write_json

        report = dry_run(cfg, args.world, ranks, args.gpu, trace=not args.no_trace)
    except Exception as e:
        if exit_status(e) is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        write_json(report, args.json)
    worst = report.peak_bytes() / 2**30
    if not report.fits:
        print(f"does not fit: rank {report.worst_rank} needs {worst:.1f} GiB of {args.gpu}'s "
              f"{report.gpu_memory / 2**30:.0f} GiB ({report.seconds:.0f} s)")
        return 3
    print(f"fits: rank {report.worst_rank}, the most loaded, needs {worst:.1f} GiB of {args.gpu}'s "
          f"{report.gpu_memory / 2**30:.0f} GiB ({len(report.ranks)} ranks simulated in {report.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
