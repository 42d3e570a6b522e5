"""Layout names: what a short name such as ``fsdp2-tp2`` or ``pp4-interleaved`` means as config overrides.

Layout names are dash-separated parts, read left to right:

    single            one process
    ddp<N>            DDP over N data-parallel ranks
    fsdp<N>           FSDP2 over N ranks
    hsdp<R>x<S>       FSDP2 as HSDP: R replica groups of S shards (R*S ranks)
    zero<K>           DeepSpeed ZeRO stage K over 2 data-parallel ranks (change with dp<N>)
    offload           with zero<K>: offload optimizer state and parameters (stage 3) to the CPU
    dp<N>             the data-parallel size, for engines named without one
    tp<N>, pp<N>,     tensor / pipeline / context parallel sizes; may be fused, e.g. tp2pp2, tp2cp2
    cp<N>, ep<N>      (ep: the experts split over N of the data-parallel ranks; dp defaults to N)
    sp                with tp<N>: sequence parallelism
    gpipe, 1f1b,      with pp<N>: the pipeline schedule (default 1f1b); interleaved and zb (interleaved zero-bubble)
    interleaved, zb   run v<N> stages per rank (default 2)
    v<N>              virtual stages per pipeline rank

e.g. ``ddp2``, ``zero3-offload``, ``hsdp2x2``, ``zero1-tp2`` (4 ranks), ``tp2-sp`` (2 ranks), ``fsdp2-tp2``,
``pp2-interleaved-v2``, ``fsdp2-pp2-1f1b`` (4 ranks), ``tp2pp2-1f1b``, ``cp2``, ``fsdp2-cp2`` (4 ranks), ``ep2``,
``ddp4-ep2``, ``tp2ep2`` (4 ranks). The world size is dp x tp x pp x cp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_lite.config import ConfigError

ZERO_DEFAULT_DP = 2


@dataclass
class Layout:
    """A named layout: how many ranks it needs, the config overrides that select it, and what the name says about
    the structure each rank must build (checked against what the ranks report, ``structure.py``)."""

    name: str
    world_size: int
    overrides: list[str] = field(default_factory=list)
    engine: str = "single"
    dp: int = 1
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    zero_stage: int = 0
    offload: bool = False
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    virtual: int = 2
    cp: int = 1
    ep: int = 1

    @property
    def stages_per_rank(self) -> int:
        return self.virtual if self.pp > 1 and self.schedule in ("interleaved", "zb") else 1


def parse_layout(name: str) -> Layout:
    """Turn a layout name (see the module docstring) into a world size and config overrides."""
    engine, dp, dp_replicate, tp, pp, cp, ep = None, None, 1, 1, 1, 1, 1
    stage, offload, sequence_parallel = None, False, False
    schedule, virtual = "1f1b", 2
    for part in name.lower().split("-"):
        if part == "single":
            engine, dp = "single", 1
        elif m := re.fullmatch(r"(ddp|fsdp)(\d+)", part):
            engine, dp = m.group(1), int(m.group(2))
        elif m := re.fullmatch(r"hsdp(\d+)x(\d+)", part):
            engine, dp_replicate, dp = "fsdp", int(m.group(1)), int(m.group(1)) * int(m.group(2))
        elif m := re.fullmatch(r"zero([0-3])", part):
            engine, stage = "deepspeed", int(m.group(1))
        elif part == "offload":
            offload = True
        elif part == "sp":
            sequence_parallel = True
        elif part in ("gpipe", "1f1b", "interleaved", "zb"):
            schedule = part
        elif m := re.fullmatch(r"v(\d+)", part):
            virtual = int(m.group(1))
        elif re.fullmatch(r"((dp|tp|pp|cp|ep)\d+)+", part):
            for axis, size in re.findall(r"(dp|tp|pp|cp|ep)(\d+)", part):
                if axis == "dp":
                    dp = int(size)
                elif axis == "ep":
                    ep = int(size)
                elif axis == "tp":
                    tp = int(size)
                elif axis == "cp":
                    cp = int(size)
                else:
                    pp = int(size)
        else:
            raise ConfigError(
                f"layout '{name}': unknown part '{part}' (expected single, ddp<N>, fsdp<N>, hsdp<R>x<S>, zero<K>, "
                "offload, dp<N>, tp<N>, pp<N>, cp<N>, ep<N>, sp, gpipe, 1f1b, interleaved, zb, v<N>)"
            )
    if dp is None:
        dp = max(ep, ZERO_DEFAULT_DP) if engine == "deepspeed" else ep
    world = dp * tp * pp * cp
    if engine is None:
        engine = "single" if world == 1 else "ddp"
    if engine == "single" and world > 1:
        raise ConfigError(f"layout '{name}': 'single' is one process, but tp x pp x cp x dp = {world}")
    if offload and engine not in ("deepspeed", "fsdp"):
        raise ConfigError(f"layout '{name}': 'offload' needs zero<K> or fsdp<N>")
    if sequence_parallel and tp == 1:
        raise ConfigError(f"layout '{name}': 'sp' needs tp<N> with N > 1")
    # a layout sets every parallel key, so whatever the config file chose cannot leak into it
    overrides = [
        f"parallel.engine={engine}",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.cp={cp}",
        f"parallel.ep={ep}",
        f"parallel.sequence_parallel={str(sequence_parallel).lower()}",
        f"parallel.pp_schedule={schedule}",
        f"parallel.pp_virtual_stages={virtual}",
        f"parallel.dp_replicate={dp_replicate}",
        f"parallel.zero_stage={stage or 0}",
        f"parallel.offload_optimizer={str(offload and engine == 'deepspeed').lower()}",
        f"parallel.offload_params={str(offload and stage == 3).lower()}",
        f"parallel.fsdp_cpu_offload={str(offload and engine == 'fsdp').lower()}",
    ]
    return Layout(name, world, overrides, engine, dp, tp, pp, dp_replicate, stage or 0, offload, sequence_parallel,
                  schedule, virtual, cp, ep)
