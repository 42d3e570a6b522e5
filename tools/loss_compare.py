"""Check that parallel layouts train exactly like one process: a table of per-step losses and a pass/fail exit code.

    python tools/loss_compare.py --config configs/quickstart.yaml --layouts single,ddp2,zero1,zero3,fsdp2 --steps 4
    python tools/loss_compare.py --config configs/tiny.yaml --layouts all data.prefixes=/data/web model.vocab_size=50304

The config's data section must name a tokenized corpus: configs/quickstart.yaml reads the shards that
``python tools/quickstart.py`` writes; configs/tiny.yaml names none, so give it ``data.prefixes=...``.

Every layout runs the same global batches, in forked processes on this machine (gloo on CPU). The exit code is 1
when any layout's loss differs from ``single`` by more than ``--tolerance`` at any step, or a layout fails to run;
2 for bad arguments. Layout names are described in ``megatron_lite/parity.py`` (ddp<N>, fsdp<N>, hsdp<R>x<S>,
zero<K>[-offload], tp<N>[-sp], pp<N>[-gpipe|-1f1b|-interleaved|-zb], ...), e.g. ``tp2``, ``tp2-sp``, ``zero1-tp2``,
``fsdp2-tp2`` (4 ranks), ``pp2-1f1b``, ``fsdp2-pp2-1f1b`` (4 ranks). In fp32 on CPU, 1e-5 is a safe tolerance; bf16
needs ~1e-2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked ranks hang if the parent ran multi-threaded OpenMP first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (its data section must point at a corpus)")
    parser.add_argument("--layouts", default="all", help="comma-separated layout names, or 'all' for the default set")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per layout")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed |loss - single| per step")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per layout before it counts as hung")
    parser.add_argument("--verbose", action="store_true", help="show the ranks' own output instead of hiding it")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. training.micro_batch_size=2")
    args = parser.parse_args(argv)

    from megatron_lite.config import ConfigError, load_config
    from megatron_lite.data import DataError, IndexedDataset, parse_blend
    from megatron_lite.parity import DEFAULT_LAYOUTS, compare_layouts, parse_layout

    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    layouts = list(DEFAULT_LAYOUTS) if args.layouts == "all" else names
    try:
        for name in layouts:
            parse_layout(name)
        if args.steps < 1:
            raise ConfigError(f"--steps={args.steps} must be positive")
        cfg = load_config(args.config, args.overrides)  # every layout would fail the same way: fail once, here
        if not cfg.data.prefixes:
            raise ConfigError(f"{args.config} names no data: add data.prefixes=PREFIX (shards written by "
                              "tools/preprocess_data.py)")
        for _, prefix in parse_blend(cfg.data.prefixes):
            IndexedDataset(prefix)  # a missing or corrupt shard is one line here, not a failure per layout
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = compare_layouts(
        args.config,
        layouts,
        steps=args.steps,
        overrides=args.overrides,
        timeout=args.timeout,
        log=lambda line: print(line, flush=True),
        quiet=not args.verbose,
    )
    print()
    print(report.table())
    failures = report.failures(args.tolerance)
    wall = time.perf_counter() - start
    if failures:
        print(f"\nFAIL: {', '.join(failures)} failed or differ from single by more than {args.tolerance:g} "
              f"({wall:.0f} s)")
        return 1
    print(f"\nOK: {len(report.losses)} layouts within {args.tolerance:g} of single over {args.steps} steps "
          f"({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
