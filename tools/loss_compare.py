"""Check that parallel layouts train exactly like one process, tensor by tensor: a table and a pass/fail exit code.

    python tools/loss_compare.py --config configs/quickstart.yaml --layouts single,ddp2,zero1,zero3,fsdp2 --steps 4
    python tools/loss_compare.py --config configs/tiny.yaml --layouts all data.prefixes=/data/web model.vocab_size=50304

The config's data section must name a tokenized corpus: configs/quickstart.yaml reads the shards that
``python tools/quickstart.py`` writes; configs/tiny.yaml names none, so give it ``data.prefixes=...``.

Every layout runs the same global batches, in forked processes on this machine (gloo on CPU): first ``--grad-steps``
steps at learning rate 0 from the initial weights, where every rank's piece of every gradient is compared with the
same box of ``single``'s gradient (``--grad-rtol``, relative to the tensor's norm), then the training steps, whose
losses are compared (``--tolerance``). Each rank also reports what it built, which must be what the layout's name
says (a tp2 rank holds half of each split tensor, a pp4 rank only its stages' blocks). The exit code is 1 when any
layout differs or fails to run, and the lines under the table name the worst tensor and the rank; 2 for bad
arguments. Layout names are described in ``megatron_lite/parity.py`` (ddp<N>, fsdp<N>, hsdp<R>x<S>,
zero<K>[-offload], tp<N>[-sp], pp<N>[-gpipe|-1f1b|-interleaved|-zb], ...), e.g. ``tp2``, ``tp2-sp``, ``zero1-tp2``,
``fsdp2-tp2`` (4 ranks), ``pp2-1f1b``, ``fsdp2-pp2-1f1b`` (4 ranks). In fp32 on CPU the defaults hold (largest
differences measured on correct layouts are in ``docs/benchmarks.md``, "Parity"); bf16 needs looser bounds.
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
    parser.add_argument("--layouts", default="all", help="comma-separated layout names, or 'all' for the default set "
                        "(with ep2 and fsdp2-ep2 for a mixture-of-experts model)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per layout")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed |loss - single| per step")
    parser.add_argument("--grad-rtol", type=float, default=None,
                        help="largest allowed |gradient piece - single's| / |single's tensor| (default 1e-5)")
    parser.add_argument("--grad-steps", type=int, default=None,
                        help="frozen-weights steps whose gradients are compared (default: min(steps, 4))")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per layout before it counts as hung")
    parser.add_argument("--verbose", action="store_true", help="show the ranks' own output instead of hiding it")
    parser.add_argument("--markdown", action="store_true", help="also print one markdown row per layout")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. training.micro_batch_size=2")
    args = parser.parse_args(argv)

    from megatron_lite.config import ConfigError, load_config
    from megatron_lite.data import DataError, IndexedDataset, parse_blend
    from megatron_lite.parity import DEFAULT_LAYOUTS, EXPERT_LAYOUTS, GRAD_RTOL, compare_layouts, parse_layout

    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    layouts = list(DEFAULT_LAYOUTS) if args.layouts == "all" else names
    try:
        for name in layouts:
            parse_layout(name)
        if args.steps < 1:
            raise ConfigError(f"--steps={args.steps} must be positive")
        if args.grad_steps is not None and args.grad_steps < 0:
            raise ConfigError(f"--grad-steps={args.grad_steps} must be 0 or more")
        cfg = load_config(args.config, args.overrides)  # every layout would fail the same way: fail once, here
        if not cfg.data.prefixes:
            raise ConfigError(f"{args.config} names no data: add data.prefixes=PREFIX (shards written by "
                              "tools/preprocess_data.py)")
        for _, prefix in parse_blend(cfg.data.prefixes):
            IndexedDataset(prefix)  # a missing or corrupt shard is one line here, not a failure per layout
        if args.layouts == "all" and cfg.model.moe.enabled:
            layouts += list(EXPERT_LAYOUTS)  # a mixture model: its experts split over the data-parallel ranks too
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
        grad_steps=args.grad_steps,
    )
    grad_rtol = GRAD_RTOL if args.grad_rtol is None else args.grad_rtol
    print()
    print(report.table(args.tolerance, grad_rtol))
    if args.markdown:
        print("\n" + report.markdown(args.tolerance, grad_rtol))
    failures = report.failures(args.tolerance, grad_rtol)
    wall = time.perf_counter() - start
    if failures:
        print(f"\nFAIL: {', '.join(failures)} failed or differ from single ({wall:.0f} s)")
        return 1
    print(f"\nOK: {len(report.losses)} layouts within {args.tolerance:g} of single over {args.steps} steps, every "
          f"gradient within {grad_rtol:g} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
