"""Proof of layout: what each rank built (``Engine.holdings``) must be what the layout's name says.

A layout that silently fell back to replicating the model (tensor or pipeline parallelism dropped for some engine)
would match one process exactly, so matching losses prove nothing about parallelism. Each rank reports its engine,
its wrapper, its coordinates, its pipeline stages, and for every parameter the elements of the full tensor and the
elements it holds; this module checks them against the parsed name, counting elements across the ranks of each group:

- tp<N>: attention and MLP projections and the embedding hold 1/N of the tensor on each rank of the group;
- pp<N>: each rank holds its own stages (v of them for interleaved schedules) and only their blocks, the blocks of
  the pipeline ranks are disjoint and together all of them;
- fsdp / hsdp: every parameter's shards over the shard group add up to the (tensor-parallel) tensor, and the
  projections are split (each rank holds less than the whole);
- zero3: each rank holds a ZeRO partition of every parameter; zero1/zero2: the optimizer steps a partition (their
  elements over the data-parallel group add up to the model's); ddp, zero0, single: whole tensors and a whole
  optimizer; sp and offload as named;
- ep<N>: each rank of an expert-parallel group holds 1/N of every mixture layer's experts, whole (mixture layers
  are never split by tp), the group's ranks disjoint and together all of them.
"""

from __future__ import annotations

import math
import re

from megatron_lite.models.moe import is_mixture_param
from megatron_lite.parity.layouts import Layout

ENGINE_CLASSES = {"single": "SingleEngine", "ddp": "DDPEngine", "fsdp": "FSDPEngine", "deepspeed": "DeepSpeedEngine"}
SPLIT_BY_TP = ("q_proj.weight", "o_proj.weight", "up_proj.weight", "down_proj.weight")  # and the embedding
BLOCK = re.compile(r"^layers\.(\d+)\.")
EXPERT = re.compile(r"^layers\.(\d+)\..*experts\.(\d+)\.")


def check_structure(layout: Layout, ranks: list[dict]) -> list[str]:
    """Every way the ranks' holdings (index = global rank) differ from what ``layout`` says; [] when none do."""
    errors = [f"{len(ranks)} ranks reported, the layout has {layout.world_size}"] if len(ranks) != layout.world_size \
        else []
    for r, h in enumerate(ranks):
        errors += [f"rank {r}: {e}" for e in _rank_errors(layout, h)]
    if errors:
        return errors
    return _group_errors(layout, ranks) + _expert_errors(layout, ranks)


def _rank_errors(layout: Layout, h: dict) -> list[str]:
    errors = []
    if h["engine"] != ENGINE_CLASSES[layout.engine]:
        errors.append(f"engine {h['engine']}, expected {ENGINE_CLASSES[layout.engine]}")
    for axis in ("dp", "tp", "pp", "cp", "ep", "dp_replicate"):
        if h.get(axis, 1) != getattr(layout, axis):
            errors.append(f"{axis}={h[axis]}, the layout says {getattr(layout, axis)}")
    if layout.pp == 1:
        wrapper = {"ddp": "DistributedDataParallel" if layout.dp > 1 else None, "deepspeed": "DeepSpeedEngine"}
        want = wrapper.get(layout.engine)
        if want and h["module"] != want:
            errors.append(f"the forward runs {h['module']}, expected {want}")
        if layout.engine == "fsdp" and not h["module"].startswith("FSDP"):
            errors.append(f"the forward runs {h['module']}, expected an FSDP module")
    if h["sequence_parallel"] != layout.sequence_parallel:
        errors.append(f"sequence parallelism {'on' if h['sequence_parallel'] else 'off'}, the layout says "
                      f"{'on' if layout.sequence_parallel else 'off'}")
    want_offload = [] if not layout.offload else ["optimizer", "params"] if layout.zero_stage == 3 or \
        layout.engine == "fsdp" else ["optimizer"]
    if sorted(h["offload"]) != sorted(want_offload):
        errors.append(f"offloads {h['offload'] or 'nothing'}, expected {want_offload or 'nothing'}")
    stages = layout.pp * layout.stages_per_rank
    mine = [s for s in range(stages) if s % layout.pp == h["coords"]["pp"]]
    if h["num_stages"] != stages or h["stages"] != mine:
        errors.append(f"pipeline stages {h['stages']} of {h['num_stages']}, expected {mine} of {stages}")
    return errors


def _groups(ranks: list[dict], *fixed: str) -> dict[tuple, list[dict]]:
    """The ranks grouped by their coordinates along ``fixed`` (e.g. ranks differing only in dp and cp)."""
    out: dict[tuple, list[dict]] = {}
    for h in ranks:
        out.setdefault(tuple(h["coords"].get(a, 0) for a in fixed), []).append(h)
    return out


def _split_by_tp(name: str) -> bool:
    return (name.endswith(SPLIT_BY_TP) and not is_mixture_param(name)) or name == "embed.weight"


def _expert_errors(layout: Layout, ranks: list[dict]) -> list[str]:
    """The ranks of each expert-parallel group (same pp, tp, cp and expert-data index) hold disjoint sets of (layer,
    expert), 1/ep of the stage's each, that together are all of them."""
    errors = []
    held = [{(int(m.group(1)), int(m.group(2))) for n in h["params"] if (m := EXPERT.match(n))} for h in ranks]
    groups: dict[tuple, list[int]] = {}
    for r, h in enumerate(ranks):
        c = h["coords"]
        groups.setdefault((c.get("pp", 0), c.get("tp", 0), c.get("cp", 0), c.get("dp", 0) // layout.ep), []).append(r)
    for (pp, tp, cp, edp), members in groups.items():
        sets = [held[r] for r in members]
        union = set().union(*sets)
        if sum(map(len, sets)) != len(union) or any(len(s) * layout.ep != len(union) for s in sets):
            errors.append(f"expert-parallel group at pp={pp}, tp={tp}, cp={cp}, expert-data index {edp} holds experts "
                          f"{[len(s) for s in sets]} of {len(union)}: not a partition into {layout.ep} equal parts")
    return errors


def _group_errors(layout: Layout, ranks: list[dict]) -> list[str]:
    errors: list[str] = []
    # Pipeline: each pipeline rank's blocks are its own, and together they are all the blocks.
    blocks = {r: {int(m.group(1)) for n in h["params"] if (m := BLOCK.match(n))} for r, h in enumerate(ranks)}
    everything = set().union(*blocks.values())
    for (dp, cp, tp), group in _groups(ranks, "dp", "cp", "tp").items():
        held = [blocks[ranks.index(h)] for h in group]
        if sum(map(len, held)) != len(everything) or set().union(*held) != everything:
            errors.append(f"pipeline ranks at dp={dp}, cp={cp}, tp={tp} hold blocks {[sorted(b) for b in held]}: "
                          f"not a partition of the {len(everything)} blocks")
    # Elements per tensor over the data-parallel group (same pp and tp coordinates): sharded or whole, as named.
    for (pp, tp), group in _groups(ranks, "pp", "tp").items():
        names = group[0]["params"]
        for name, (full, _) in names.items():
            held = [h["params"][name][1] for h in group if name in h["params"]]
            local = full // layout.tp if layout.tp > 1 and _split_by_tp(name) else None
            errors += _tensor_errors(layout, name, full, local, held, (pp, tp))
        if layout.engine == "deepspeed" and layout.zero_stage in (1, 2) and layout.dp * layout.cp > 1:
            steps = [h["optimizer_numel"] for h in group]
            total = sum(held for _, held in names.values())
            if any(n >= total for n in steps) or sum(steps) < total:
                errors.append(f"ZeRO-{layout.zero_stage} at pp={pp}, tp={tp}: the optimizer steps {steps} elements on "
                              f"the data-parallel ranks, expected partitions adding up to the {total} of the model")
    return errors


def _tensor_errors(layout: Layout, name: str, full: int, local: int | None, held: list[int],
                   where: tuple[int, int]) -> list[str]:
    """``held``: the elements of ``name`` on each rank of one data-parallel group; ``local``: the tensor-parallel
    shard's size where the name must be split over the tensor axis."""
    at = f"{name} at pp={where[0]}, tp={where[1]}"
    data = layout.dp * layout.cp  # the ranks that hold the same weights
    shard_group = data // layout.dp_replicate if layout.engine == "fsdp" else 1
    if layout.engine == "deepspeed" and layout.zero_stage == 3:
        part = math.ceil(full / data)
        if any(h != part for h in held):
            return [f"{at}: ZeRO-3 ranks hold {held} elements, expected partitions of {part} (of {full})"]
        return []
    whole = {full, full // layout.tp} if local is None else {local}  # a tensor-parallel shard, or the whole tensor
    if shard_group == 1:
        if any(h not in whole for h in held):
            return [f"{at}: ranks hold {held} elements, expected {sorted(whole)} (of {full})"]
        return []
    total = sum(held) // layout.dp_replicate
    if total not in whole:
        return [f"{at}: the FSDP shards add up to {total} elements, expected {sorted(whole)} (of {full})"]
    if local is not None and max(held) >= local:
        return [f"{at}: an FSDP rank holds {max(held)} of its {local} elements: not sharded"]
    return []
