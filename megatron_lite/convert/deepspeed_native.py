"""Import a checkpoint directory written by DeepSpeed's own ``engine.save_checkpoint`` (ZeRO 1-3) as ours.

What DeepSpeed writes under ``DIR/<tag>/`` (``DIR/latest`` names the tag), for data-parallel world size ``W``:

- ``mp_rank_00_model_states.pt`` (ZeRO 1-2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt`` (ZeRO-3, one per rank):
  ``module`` (the module's state dict: full weights under ZeRO 1-2, empty placeholders under ZeRO-3),
  ``param_shapes`` (per optimizer group, an ordered name -> shape map: the order tensors are flattened in),
  ``shared_params`` (tied name -> first name), ``buffer_names``, ``global_steps``, ``global_samples``.
- ``zero_pp_rank_R_mp_rank_00_optim_states.pt``, one per rank, ``optimizer_state_dict`` holding, per group, rank R's
  slice of the flat fp32 master weights and the AdamW moments shaped like it:
  - ZeRO 1-2: ``single_partition_of_fp32_groups[g]``, ``base_optimizer_state["state"][g]``. The ranks' slices,
    concatenated, are the group's flat vector: each parameter in ``param_shapes`` order, followed by its
    ``param_alignment_paddings`` entry.
  - ZeRO-3: ``fp32_flat_groups[g]``, ``optimizer_state_dict["state"][g]``. Each parameter is split on its own into
    ``ceil(numel / W)`` elements per rank (the last padded), and rank R's groups hold its piece of every parameter
    in order.

Each parameter is assembled from the ranks' memory-mapped files and written before the next is read, so memory holds
one parameter, not the model. Files are loaded with ``torch.load(weights_only=True)``; DeepSpeed's few small records
(its ZeRO stage enum, loss scaler and fragment addresses) are read as inert stand-ins. Anything else that needs pickle
is refused unless the caller trusts the files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from megatron_lite.config import Config
from megatron_lite.convert.checkpoint_io import check_model_tensors, write_meta
from megatron_lite.convert.errors import ConvertError
from megatron_lite.convert.hf_dir import DEFAULT_SHARD_BYTES, Converted
from megatron_lite.convert.streaming import Entry, Progress, ShardedWriter
from megatron_lite.step.checkpoint_format import MODEL, OPTIM

MOMENTS = ("exp_avg", "exp_avg_sq")


class _Record:
    """An object restored from its attribute dict only (DeepSpeed's loss scaler): no code of its class runs."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class _Fields(tuple):
    """A namedtuple restored as a plain tuple (DeepSpeed's ``fragment_address``)."""

    def __new__(cls, *args: Any) -> "_Fields":
        return tuple.__new__(cls, args)


def _enum_value(value: Any) -> Any:
    """An enum member restored as its value (DeepSpeed's ``ZeroStageEnum``)."""
    return value


# DeepSpeed records that need pickle, mapped to stand-ins the weights-only unpickler may build.
_STAND_INS = [
    (_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Fields, "deepspeed.utils.tensor_fragment.fragment_address"),
]
_KNOWN = {name for _, name in _STAND_INS}


def load_file(path: Path, trust_pickle: bool) -> dict:
    """``torch.load`` a DeepSpeed file memory-mapped, without running pickle code unless ``trust_pickle``."""
    if not path.is_file():
        raise ConvertError(f"{path}: missing (a shard of this DeepSpeed checkpoint is missing)")
    if trust_pickle:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    unknown = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - _KNOWN)
    if unknown:
        raise ConvertError(f"{path}: loading needs pickle to build {', '.join(unknown[:4])}, which could run code; "
                           "pass --trust-pickle if you trust this file")
    with torch.serialization.safe_globals(_STAND_INS):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _tag_dir(root: Path, tag: str | None) -> Path:
    if not root.is_dir():
        raise ConvertError(f"{root}: no such DeepSpeed checkpoint directory")
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise ConvertError(f"{root}: no 'latest' file naming a checkpoint tag; give one with --tag")
        tag = latest.read_text().strip()
    path = root / tag
    if not path.is_dir():
        raise ConvertError(f"{path}: no such checkpoint tag directory")
    return path


class _Group:
    """One optimizer group across ranks: the per-rank flat fp32 slices and moments, and the group's layout."""

    def __init__(self, shapes: dict[str, torch.Size], flats: list[torch.Tensor], moments: list[dict],
                 paddings: list[int] | None) -> None:
        self.shapes, self.flats, self.moments = shapes, flats, moments
        self.paddings = paddings or [0] * len(shapes)


def _slice_zero12(parts: list[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Elements ``[start, start+numel)`` of the ranks' slices concatenated, copying only those elements."""
    out, pos = [], 0
    for part in parts:
        lo, hi = max(start, pos), min(start + numel, pos + part.numel())
        if lo < hi:
            out.append(part[lo - pos: hi - pos])
        pos += part.numel()
    return torch.cat(out) if len(out) > 1 else out[0].clone()


def import_deepspeed(root: Path, out: Path, config: Config, tag: str | None = None, trust_pickle: bool = False,
                     progress: bool = True) -> Converted:
    """Write the DeepSpeed checkpoint ``root`` (tag ``tag``, default ``latest``) as our logical checkpoint in ``out``:
    fp32 weights and AdamW moments under our names, for the model ``config`` describes."""
    ckpt = _tag_dir(Path(root), tag)
    optim_files = sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                         key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))
    model_file = ckpt / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        model_file = ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConvertError(f"{ckpt}: no mp_rank_00_model_states.pt (expected a directory written by DeepSpeed's "
                           "save_checkpoint)")
    states = load_file(model_file, trust_pickle)
    if not optim_files:
        raise ConvertError(f"{ckpt}: no zero_pp_rank_*_optim_states.pt files (a ZeRO 1-3 checkpoint has one per rank)")
    world = int(states.get("dp_world_size", len(optim_files)))
    expected = [ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    for path in expected:
        if not path.is_file():
            raise ConvertError(f"{path}: missing; this checkpoint was saved by {world} data-parallel ranks (a shard of "
                               "it is missing)")
    if states.get("frozen_param_shapes"):
        raise ConvertError(f"{model_file}: frozen parameters are not supported")
    if int(states.get("mp_world_size", 1)) != 1:
        raise ConvertError(f"{model_file}: saved with model parallelism ({states['mp_world_size']}); only ZeRO "
                           "data parallelism is supported")
    optims = [load_file(p, trust_pickle)["optimizer_state_dict"] for p in expected]
    stage = int(optims[0].get("zero_stage", 0))
    if stage not in (1, 2, 3):
        raise ConvertError(f"{expected[0]}: zero_stage {stage}; expected a ZeRO 1-3 checkpoint")

    shapes_per_group: list[dict[str, torch.Size]] = states["param_shapes"]
    if stage == 3:
        flats = [o["fp32_flat_groups"] for o in optims]
        moment_states = [o["optimizer_state_dict"]["state"] for o in optims]
        paddings = None
    else:
        flats = [o["single_partition_of_fp32_groups"] for o in optims]
        moment_states = [o["base_optimizer_state"]["state"] for o in optims]
        paddings = optims[0].get("param_alignment_paddings")
    groups = [_Group(dict(shapes), [f[g] for f in flats], [m[g] for m in moment_states],
                     paddings[g] if paddings else None) for g, shapes in enumerate(shapes_per_group)]

    shared: dict[str, str] = dict(states.get("shared_params") or {})
    buffers = [n for n in states.get("buffer_names") or [] if n in states["module"]]
    have = {MODEL + n: tuple(s) for g in groups for n, s in g.shapes.items()}
    have.update({MODEL + t: have[MODEL + f] for t, f in shared.items() if MODEL + f in have})
    have.update({MODEL + n: tuple(states["module"][n].shape) for n in buffers})
    check_model_tensors(have, config.model, str(ckpt))
    steps = {float(m["step"]) for g in groups for m in g.moments}
    if len(steps) != 1:
        raise ConvertError(f"{ckpt}: optimizer groups disagree on the AdamW step count: {sorted(steps)}")
    step_count = torch.tensor(steps.pop(), dtype=torch.float32)

    # Plan: per parameter its weight (and tied names), moments and step; buffers last.
    entries: list[Entry] = []
    for g in groups:
        for name, shape in g.shapes.items():
            shape = tuple(shape)
            entries.append(Entry(MODEL + name, shape, torch.float32))
            entries += [Entry(MODEL + t, shape, torch.float32) for t, f in shared.items() if f == name]
            entries += [Entry(f"{OPTIM}{name}.{k}", shape, torch.float32) for k in MOMENTS]
            entries.append(Entry(f"{OPTIM}{name}.step", (), torch.float32))
    entries += [Entry(MODEL + n, tuple(states["module"][n].shape), states["module"][n].dtype) for n in buffers]
    writer = ShardedWriter(out, entries, DEFAULT_SHARD_BYTES)
    bar = Progress(sum(e.nbytes for e in entries), len(entries), "from deepspeed", enabled=progress)
    try:
        for g in groups:
            offset = 0  # ZeRO 1-2: into the group's flat vector; ZeRO-3: into each rank's slice
            for (name, shape), pad in zip(g.shapes.items(), g.paddings):
                numel = math.prod(shape)
                if stage == 3:
                    part = math.ceil(numel / world)

                    def gather(parts: list[torch.Tensor]) -> torch.Tensor:
                        return torch.cat([p[offset: offset + part] for p in parts])[:numel].reshape(shape)
                    advance = part
                else:
                    def gather(parts: list[torch.Tensor]) -> torch.Tensor:
                        return _slice_zero12(parts, offset, numel).reshape(shape)
                    advance = numel + pad
                weight = gather(g.flats)
                writer.write(MODEL + name, weight)
                for t in (t for t, f in shared.items() if f == name):
                    writer.write(MODEL + t, weight)
                for key in MOMENTS:
                    writer.write(f"{OPTIM}{name}.{key}", gather([m[key] for m in g.moments]))
                writer.write(f"{OPTIM}{name}.step", step_count)
                bar.update(4 * numel * (3 + sum(1 for f in shared.values() if f == name)),
                           4 + sum(1 for f in shared.values() if f == name))
                offset += advance
                del weight
        for n in buffers:
            writer.write(MODEL + n, states["module"][n])
        writer.close()
    finally:
        bar.close()
    # DeepSpeed's step and sample counts, so that checkpoint.load continues the schedule where the run stopped
    step, samples = int(states.get("global_steps", 0)), int(states.get("global_samples", 0))
    write_meta(out, config, {"kind": "deepspeed", "path": str(ckpt.resolve()), "zero_stage": stage,
                             "world_size": world}, step=step, consumed=samples)
    return Converted(len(entries), sum(e.nbytes for e in entries), writer.files)
