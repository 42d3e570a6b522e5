"""Pipeline parallelism: the model split by layer into stages, run by ``torch.distributed.pipelining`` schedules.

**Split.** ``pp x v`` stages (``v`` virtual stages per rank for the interleaved and zero-bubble schedules), each a
contiguous run of blocks: balanced by parameter count (the embedding counts towards the first stage, the final norm
and head towards the last), or as given in ``parallel.pp_layers``. Stage ``s`` lives on pipeline rank ``s % pp``.

**Modules.** A rank keeps one *holder*: the plain model with only the parts its stages own (blocks keep their global
index, so names, initial values and checkpoints are those of the whole model). Each of its stages is a *view*: a
second instance of the model class whose children are the holder's own modules, with the blocks and parts it does not
run removed. The holder is what engines shard, materialize, optimize and save; the views are what the schedule runs.
The first stage takes token ids, later stages hidden states; position ids, document ids and padding masks reach every
stage as keyword arguments.

**Schedules** come from ``torch.distributed.pipelining`` (GPipe, 1F1B, interleaved 1F1B, interleaved zero-bubble),
built by hand from ``PipelineStage``: no schedule is written here. Their loss is the shared step's token-weighted one:
each microbatch's summed token loss times ``dp / global tokens``, with ``scale_grads=False``.

**Tied embeddings.** With ``tie_embeddings`` the first stage holds ``embed.weight`` and the last ``lm_head.weight``:
two copies of one tensor, initialized from the same name, whose gradients are summed between the two ranks before
every optimizer step, so that both receive the same update and stay bit-identical. The gradient norm counts the pair
once, and the optimizer state is saved once, under the tensor's first name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config, ConfigError, microbatches_per_rank
from megatron_lite.topology import Topology

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")


def virtual_stages(cfg: Config) -> int:
    """Stages per pipeline rank: ``pp_virtual_stages`` for the interleaved schedules, else 1."""
    return cfg.parallel.pp_virtual_stages if cfg.parallel.pp_schedule in ("interleaved", "zb") else 1


def split_layers(cfg: Config, block_params: int, first_params: int, last_params: int) -> list[range]:
    """The blocks of each of the ``pp x v`` stages: ``parallel.pp_layers`` when given, else contiguous runs that keep
    the largest stage's parameter count (blocks, plus the embedding on the first and the head on the last) smallest."""
    par, layers = cfg.parallel, cfg.model.num_layers
    stages = par.pp * virtual_stages(cfg)
    if par.pp_layers is not None:
        counts = list(par.pp_layers)
        if len(counts) != stages or any(not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != layers:
            raise ConfigError(
                f"parallel.pp_layers={counts} must give {stages} positive layer counts (parallel.pp={par.pp} x "
                f"{virtual_stages(cfg)} stages per rank) that add up to model.num_layers={layers}"
            )
    else:
        if stages > layers:
            raise ConfigError(
                f"{stages} pipeline stages (parallel.pp={par.pp} x {virtual_stages(cfg)} per rank) for "
                f"model.num_layers={layers}: every stage needs at least one layer"
            )
        counts = _balanced(layers, stages, block_params, first_params, last_params)
    starts = [sum(counts[:i]) for i in range(stages)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


def _balanced(layers: int, stages: int, block: int, first: int, last: int) -> list[int]:
    """Layer counts minimizing the largest stage (binary search on the bound, greedy fill); ties go to earlier stages."""

    def fits(bound: int) -> list[int] | None:
        counts, left = [], layers
        for s in range(stages):
            extra = (first if s == 0 else 0) + (last if s == stages - 1 else 0)
            room = (bound - extra) // block if block else left
            need_after = stages - s - 1  # each later stage needs one layer
            n = min(room, left - need_after)
            if n < 1:
                return None
            counts.append(n)
            left -= n
        return counts if left == 0 else None

    lo, hi = block, layers * block + first + last
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return fits(lo)


def check_pipeline(cfg: Config, dp: int) -> None:
    """Refuse schedules that cannot run this step, in one line naming the key."""
    par = cfg.parallel
    if par.pp == 1:
        return
    if par.pp_virtual_stages < 1:
        raise ConfigError(f"parallel.pp_virtual_stages={par.pp_virtual_stages} must be positive")
    m = microbatches_per_rank(cfg.global_batch_size, cfg.training.micro_batch_size, dp)
    stages = par.pp * virtual_stages(cfg)
    if par.pp_schedule == "1f1b" and m < par.pp:
        bubble = (par.pp - 1) / (m + par.pp - 1)
        raise ConfigError(
            f"parallel.pp_schedule=1f1b needs at least parallel.pp={par.pp} microbatches per step, got {m} "
            f"(training.global_batch_size / (micro_batch_size x dp)); the bubble would be {bubble:.0%} of the step: "
            "raise the global batch or lower the micro batch"
        )
    rounds = max(1, m // par.pp)  # the interleaved schedules run the microbatches in equal rounds
    if par.pp_schedule in ("interleaved", "zb") and m % rounds:
        raise ConfigError(
            f"parallel.pp_schedule={par.pp_schedule} cannot run {m} microbatches per step "
            f"(training.global_batch_size / (micro_batch_size x dp)) in {rounds} equal rounds of about parallel.pp="
            f"{par.pp}: use a multiple of {par.pp}, or fewer than {2 * par.pp}"
        )
    if stages > cfg.model.num_layers and par.pp_layers is None:
        raise ConfigError(
            f"{stages} pipeline stages (parallel.pp={par.pp} x {virtual_stages(cfg)} per rank) for "
            f"model.num_layers={cfg.model.num_layers}: every stage needs at least one layer"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Holder and stage views
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PipelineParts:
    """What one rank holds: the holder (plain names), its stage views in schedule order, and their global indices."""

    holder: nn.Module
    stages: list[nn.Module]
    indices: list[int]
    num_stages: int
    tied: list[tuple[str, str]] = field(default_factory=list)  # (first-stage name, last-stage name) of tied copies


FIRST_PARTS = ("embed", "pos_embed")  # parts of the first stage and of the last (decoder family)
LAST_PARTS = ("final_norm", "lm_head")


def split_model(model: nn.Module, cfg: Config, topology: Topology) -> PipelineParts:
    """Cut the (meta) model into this rank's holder and stage views; see the module docstring."""
    pp, rank = topology.pp, topology.pp_rank
    block = sum(p.numel() for p in model.layers["0"].parameters())
    first = sum(p.numel() for name in FIRST_PARTS if getattr(model, name, None) is not None
                for p in getattr(model, name).parameters())
    last = sum(p.numel() for name in LAST_PARTS if getattr(model, name, None) is not None
               for p in getattr(model, name).parameters())
    ranges = split_layers(cfg, block, first, last)
    num_stages = len(ranges)
    indices = [s for s in range(num_stages) if s % pp == rank]
    mine = {str(i) for s in indices for i in ranges[s]}
    tied = _tied_across(model) if 0 not in indices or num_stages - 1 not in indices else []
    for key in [k for k in model.layers if k not in mine]:
        del model.layers[key]
    if 0 not in indices:
        for name in FIRST_PARTS:
            setattr(model, name, None)
    if num_stages - 1 not in indices:
        for name in LAST_PARTS:
            setattr(model, name, None)
    stages = [_view(model, ranges[s], s == 0, s == num_stages - 1) for s in indices]
    return PipelineParts(model, stages, indices, num_stages, tied)


def _tied_across(model: nn.Module) -> list[tuple[str, str]]:
    """Tensors shared between a first-stage part and a last-stage part (tied embeddings), as name pairs."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    pairs = []
    for group in names.values():
        firsts = [n for n in group if n.split(".")[0] in FIRST_PARTS]
        lasts = [n for n in group if n.split(".")[0] in LAST_PARTS]
        if firsts and lasts:
            pairs.append((firsts[0], lasts[0]))
    return pairs


def _view(holder: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """A stage: a shallow copy of the holder that runs only ``layers`` (and the first / last parts)."""
    view = copy.copy(holder)
    view._modules = dict(holder._modules)
    view._parameters = dict(holder._parameters)
    view._buffers = dict(holder._buffers)
    view.layers = nn.ModuleDict({str(i): holder.layers[str(i)] for i in layers})
    if not first:
        for name in FIRST_PARTS:
            setattr(view, name, None)
    if not last:
        for name in LAST_PARTS:
            setattr(view, name, None)
    return view


# ----------------------------------------------------------------------------------------------------------------------
# Running a step
# ----------------------------------------------------------------------------------------------------------------------


class PipelineRunner:
    """The schedule over this rank's stages, with the shared step's token-weighted loss on the last stage."""

    def __init__(self, stages: list[nn.Module], parts: PipelineParts, cfg: Config, topology: Topology,
                 loss: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]) -> None:
        from torch.distributed.pipelining import PipelineStage

        self.parts, self.topology, self.loss = parts, topology, loss
        self.schedule_name = cfg.parallel.pp_schedule
        group = topology.group("pp")
        self.stages = [PipelineStage(module, index, parts.num_stages, topology.device, group=group)
                       for module, index in zip(stages, parts.indices)]
        self.is_first = 0 in parts.indices
        self.is_last = parts.num_stages - 1 in parts.indices
        self.scale = 1.0
        self._schedules: dict[tuple[int, bool], object] = {}
        self._tied_group = tied_group(topology) if parts.tied else None

    def _schedule(self, n: int, train: bool):
        key = (n, train)
        if key not in self._schedules:
            from torch.distributed import pipelining as pl

            def loss_fn(output, target):
                return self.loss(output, target, train) * (self.scale if train else 1.0)

            # Evaluation runs forward only, all microbatches stage by stage: GPipe, or its looped form for several
            # stages per rank.
            kind = self.schedule_name if train else ("loop" if len(self.stages) > 1 else "gpipe")
            multi = {"interleaved": pl.ScheduleInterleaved1F1B, "zb": pl.ScheduleInterleavedZeroBubble,
                     "loop": pl.ScheduleLoopedBFS}
            if kind in multi:
                schedule = multi[kind](self.stages, n, loss_fn=loss_fn, scale_grads=False)
            else:
                cls = pl.ScheduleGPipe if kind == "gpipe" else pl.Schedule1F1B
                schedule = cls(self.stages[0], n, loss_fn=loss_fn, scale_grads=False)
            self._schedules[key] = schedule
        return self._schedules[key]

    def run(self, inputs: list[dict[str, torch.Tensor]], targets: list[torch.Tensor], scale: float,
            train: bool) -> torch.Tensor:
        """Forward (and backward) every microbatch; this rank's summed token loss (0 off the last stage)."""
        self.scale = scale
        batch = {k: torch.cat([mb[k] for mb in inputs]) for k in inputs[0]}
        first_input = batch.pop("input_ids")
        args = (first_input,) if self.is_first else ()
        kwargs: dict = {}
        losses: list[torch.Tensor] = []
        if self.is_last:
            kwargs.update(target=torch.cat(targets), losses=losses)
        schedule = self._schedule(len(inputs), train)
        (schedule.step if train else schedule.eval)(*args, **kwargs, **batch)
        total = torch.zeros((), dtype=torch.float64, device=self.topology.device)
        for value in losses:
            total += value.detach().double() / (scale if train else 1.0)
        return total

    def sum_tied_gradients(self, model: nn.Module) -> None:
        """Add up the two copies' gradients of each tied tensor (first and last stage) so both take one update."""
        if self._tied_group is None or not (self.is_first or self.is_last):
            return
        params = dict(model.named_parameters())
        for first, last in self.parts.tied:
            p = params.get(first) if self.is_first else params.get(last)
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(grad, group=self._tied_group)


def tied_group(topology: Topology):
    """The group of the first and the last pipeline rank with this rank's data and tensor coordinates."""
    mesh = topology.mesh.mesh  # [pp, dp, tp] global ranks
    mine = None
    for d in range(topology.dp):
        for t in range(topology.tp):
            ranks = sorted({int(mesh[0, d, t]), int(mesh[-1, d, t])})
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if topology.rank in ranks:
                mine = group
    return mine
