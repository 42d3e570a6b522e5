"""Pipeline parallelism: the model split by layer into stages, run by ``torch.distributed.pipelining`` schedules.

**Split.** ``pp x v`` stages (``v`` virtual stages per rank for the interleaved and zero-bubble schedules), each a
contiguous run of blocks: balanced by parameter count (each block its own; the embedding counts towards the first
stage, the final norm and head towards the last, and an encoder-decoder's embedding copy towards the decoder's first
block), or as given in ``parallel.pp_layers``. Stage ``s`` lives on pipeline rank ``s % pp``.

**Modules.** A rank keeps one *holder*: the plain model with only the parts its stages own (blocks keep their global
index, so names, initial values and checkpoints are those of the whole model). Each of its stages is a *view*: a
second instance of the model class whose children are the holder's own modules, with the blocks and parts it does not
run removed. The holder is what engines shard, materialize, optimize and save; the views are what the schedule runs.
The first stage takes token ids, later stages hidden states; position ids, document ids and padding masks reach every
stage as keyword arguments.

**Static shapes.** Each stage is told what it receives and sends (``stage_io``) instead of inferring it by sending
shapes and a trial forward between stages at start: the model says the shapes at each block boundary for a microbatch
(``stage_boundary``), sequence parallelism splits the hidden states along the sequence and tensor parallelism the
logits along the vocabulary, and ``boundary_dtypes`` gives the dtype the engine's precision computes them in. Every
stage's output is checked against what it declared on every forward, so a wrong declaration fails on the sending rank
in one line rather than as a receive of the wrong size.

**Schedules** come from ``torch.distributed.pipelining`` (GPipe, 1F1B, interleaved 1F1B, interleaved zero-bubble),
built by hand from ``PipelineStage``: no schedule is written here. Their loss is the shared step's token-weighted one:
each microbatch's summed token loss times ``dp / global tokens``, with ``scale_grads=False``.

**Families.** The model says what a stage needs: which parts besides blocks a run of blocks uses
(``stage_parts``), their parameter counts (``stage_costs``), which parts a stage may drop (``STAGE_PARTS``) and what a
stage runs (``as_stage``: a decoder view runs itself; an encoder-decoder's runs ``EncoderDecoderStage``, which passes
``(hidden, encoder output)`` from the encoder's last block on, so that every decoder stage cross-attends, and
recomputes each stack's relative bias from its stage's copy of the table rather than sending heads x s x s along).
Nothing here names a family.

**Tied copies.** A tensor that stages on several pipeline ranks use (a decoder's tied embedding and head; an
encoder-decoder's shared embedding on the encoder's first stage, the decoder's first stage and a tied head; a bias
table whose stack spans stages) is one copy per rank, initialized from the same name, whose gradients are summed
over those ranks before every optimizer step, so that all receive the same update and stay bit-identical. The
gradient norm counts the copies once, and the optimizer state is saved once, under the tensor's first name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite import rules
from megatron_lite.config import Config
from megatron_lite.topology import Topology

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")


def split_layers(cfg: Config, block_params: int | list[int], first_params: int, last_params: int) -> list[range]:
    """The blocks of each of the ``pp x v`` stages: ``parallel.pp_layers`` when given, else contiguous runs that keep
    the largest stage's parameter count (blocks, plus the embedding on the first and the head on the last) smallest.
    ``block_params`` is every block's count (encoder and decoder blocks differ), or one count for all."""
    layers, _ = rules.num_blocks(cfg)
    stages = cfg.parallel.pp * rules.virtual_stages(cfg)
    counts = rules.check_stage_layers(cfg)
    if counts is None:
        sizes = list(block_params) if isinstance(block_params, (list, tuple)) else [block_params] * layers
        counts = _balanced(sizes, stages, first_params, last_params)
    starts = [sum(counts[:i]) for i in range(stages)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


def _balanced(sizes: list[int], stages: int, first: int, last: int) -> list[int]:
    """Layer counts minimizing the largest stage (binary search on the bound, greedy fill); ties go to earlier stages."""
    layers = len(sizes)

    def fits(bound: int) -> list[int] | None:
        counts, pos = [], 0
        for s in range(stages):
            extra = (first if s == 0 else 0) + (last if s == stages - 1 else 0)
            most = layers - pos - (stages - s - 1)  # each later stage needs one layer
            n, total = 0, extra
            while n < most and total + sizes[pos + n] <= bound:
                total += sizes[pos + n]
                n += 1
            if n < 1:
                return None
            counts.append(n)
            pos += n
        return counts if pos == layers else None

    lo, hi = max(sizes), sum(sizes) + first + last
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return fits(lo)


# ----------------------------------------------------------------------------------------------------------------------
# Holder and stage views
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TiedCopies:
    """One tensor held by the stages of several pipeline ranks: those ranks, and this rank's name for its copy."""

    ranks: tuple[int, ...]  # pipeline ranks holding a copy, ascending
    name: str | None  # this rank's (first) name of its copy; None where this rank holds none
    primary: bool  # this rank's copy is the one the gradient norm and ZeRO count (the lowest rank's)


@dataclass
class PipelineParts:
    """What one rank holds: the holder (plain names), its stage views in schedule order, and their global indices."""

    holder: nn.Module
    stages: list[nn.Module]
    indices: list[int]
    num_stages: int
    tied: list[TiedCopies] = field(default_factory=list)  # every rank's list, in the same order
    ranges: list[range] = field(default_factory=list)  # every stage's blocks, in stage order

    @property
    def copies(self) -> dict[str, int]:
        """This rank's name of each tied tensor -> how many pipeline ranks hold a copy (the gradient norm's divisor)."""
        return {t.name: len(t.ranks) for t in self.tied if t.name is not None}

    @property
    def replicas(self) -> list[str]:
        """This rank's tied copies that a gradient norm must skip (another rank's copy counts for them)."""
        return [t.name for t in self.tied if t.name is not None and not t.primary]


def split_model(model: nn.Module, cfg: Config, topology: Topology) -> PipelineParts:
    """Cut the (meta) model into this rank's holder and stage views; see the module docstring.

    The model says which of its parts besides blocks a run of blocks uses (``stage_parts``), what each part costs
    (``stage_costs``), which parts a stage may go without (``STAGE_PARTS``) and what a stage runs (``as_stage``), so
    nothing here knows a model family.
    """
    pp, rank = topology.pp, topology.pp_rank
    sizes, first, last = model.stage_costs()
    ranges = split_layers(cfg, sizes, first, last)
    num_stages = len(ranges)
    parts = [model.stage_parts(r, s == 0, s == num_stages - 1) for s, r in enumerate(ranges)]
    holders = _holding_ranks(model, ranges, parts, pp)
    rules.check_stage_sharing(cfg, ranges, [{name: [id(p) for p in _part(model, name).parameters()]
                                             for name in used if _part(model, name) is not None} for used in parts])
    indices = [s for s in range(num_stages) if s % pp == rank]
    mine = {str(i) for s in indices for i in ranges[s]}
    for key in [k for k in model.layers if k not in mine]:
        del model.layers[key]
    kept = set().union(*(parts[s] for s in indices))
    for name in model.STAGE_PARTS:
        if name not in kept:
            setattr(model, name, None)
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    tied = [TiedCopies(ranks, names.get(pid), ranks[0] == rank) for pid, ranks in holders]
    stages = [_view(model, ranges[s], parts[s]).as_stage(ranges[s]) for s in indices]
    return PipelineParts(model, stages, indices, num_stages, tied, ranges)


def _part(model: nn.Module, name: str) -> nn.Module | None:
    return getattr(model, name, None)


def _holding_ranks(model: nn.Module, ranges: list[range], parts: list[set[str]],
                   pp: int) -> list[tuple[int, tuple[int, ...]]]:
    """(id, holding pipeline ranks) of every tensor that stages on more than one rank use, in the whole model's
    parameter order (the same on every rank, so that every rank builds the same groups and sums in the same order)."""
    ranks: dict[int, set[int]] = {}
    for s, (layers, used) in enumerate(zip(ranges, parts)):
        modules = [model.layers[str(i)] for i in layers]
        modules += [_part(model, n) for n in sorted(used) if _part(model, n) is not None]
        for module in modules:
            for p in module.parameters():
                ranks.setdefault(id(p), set()).add(s % pp)
    order = [id(p) for p in model.parameters()]
    return [(pid, tuple(sorted(ranks[pid]))) for pid in order if len(ranks.get(pid, ())) > 1]


def _view(holder: nn.Module, layers: range, parts: set[str]) -> nn.Module:
    """A second instance of the holder's class whose children are the holder's own modules, keeping only the blocks
    ``layers`` and the ``parts`` they use. Every other attribute is shared, except nn.Module's own state (hook and
    child dicts): a hook that FSDP puts on one stage's root must not fire for another stage of the same rank."""
    view = object.__new__(type(holder))
    fresh = nn.Module()  # nn.Module's bookkeeping, new for this view
    view.__dict__.update({k: v for k, v in holder.__dict__.items() if k not in fresh.__dict__})
    view.__dict__.update(fresh.__dict__)
    view._modules = dict(holder._modules)
    view._parameters = dict(holder._parameters)
    view._buffers = dict(holder._buffers)
    view._non_persistent_buffers_set = set(holder._non_persistent_buffers_set)
    view.training = holder.training
    view.layers = nn.ModuleDict({str(i): holder.layers[str(i)] for i in layers})
    for name in holder.STAGE_PARTS:
        if name not in parts:
            setattr(view, name, None)
    return view


# ----------------------------------------------------------------------------------------------------------------------
# Static shapes
# ----------------------------------------------------------------------------------------------------------------------

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def boundary_dtypes(cfg: Config) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of the hidden states stages send, and of the logits the last stage returns.

    Engines that hold or cast the weights in half precision (FSDP2's ``MixedPrecisionPolicy``, DeepSpeed bf16) run
    the whole residual stream in it. Under autocast (single, DDP) the weights stay fp32, so the embedding's output
    and every residual sum are fp32, while the head, a matmul, returns the autocast dtype."""
    half = HALF_DTYPES.get(cfg.training.precision)
    if half is None:
        return torch.float32, torch.float32
    return (half if cfg.parallel.engine in ("fsdp", "deepspeed") else torch.float32), half


def stage_io(model: nn.Module, cfg: Config, tp: int, ranges: list[range], index: int,
             microbatch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Meta tensors of what stage ``index`` takes by position and returns for one ``microbatch`` (the model's
    inputs, as the task gives them): token ids on the first stage, else what crosses the boundary before its first
    block; what crosses the boundary after its last block, or the logits on the last stage. ``tp`` ranks split the
    logits along the vocabulary and, under sequence parallelism, the hidden states along the sequence."""
    hidden, logits = boundary_dtypes(cfg)
    end = ranges[-1].stop

    def crossing(block: int) -> tuple[torch.Tensor, ...]:
        tensors = []
        for shape in model.stage_boundary(block, **microbatch):
            shape = list(shape)
            if block == end:
                shape[-1] //= tp
            elif cfg.parallel.sequence_parallel:
                shape[1] //= tp
            tensors.append(torch.empty(shape, dtype=logits if block == end else hidden, device="meta",
                                       requires_grad=True))
        return tuple(tensors)

    blocks = ranges[index]
    first = (microbatch["input_ids"].to("meta"),) if index == 0 else crossing(blocks.start)
    return first, crossing(blocks.stop)


def _describe(tensors: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in tensors)


def _check_output(index: int, declared: tuple[torch.Tensor, ...], cfg: Config):
    """A forward hook: the stage's output has the shapes and dtypes its ``PipelineStage`` was given."""
    def hook(module: nn.Module, args, output) -> None:
        produced = output if isinstance(output, tuple) else (output,)
        if len(produced) != len(declared) or any(p.shape != d.shape or p.dtype != d.dtype
                                                 for p, d in zip(produced, declared)):
            raise RuntimeError(
                f"pipeline stage {index} returned {_describe(produced)} but declared {_describe(declared)} "
                f"(parallel.engine={cfg.parallel.engine}, training.precision={cfg.training.precision}): the static "
                "stage shapes (parallel/pipeline.py stage_io) disagree with the model"
            )
    return hook


# ----------------------------------------------------------------------------------------------------------------------
# Running a step
# ----------------------------------------------------------------------------------------------------------------------


class PipelineRunner:
    """The schedule over this rank's stages, with the shared step's token-weighted loss on the last stage."""

    static_shapes = True  # False: torch infers the shapes by an exchange between stages at start (a benchmark's baseline)

    def __init__(self, stages: list[nn.Module], parts: PipelineParts, cfg: Config, topology: Topology,
                 loss: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]) -> None:
        self.parts, self.topology, self.loss, self.cfg = parts, topology, loss, cfg
        self.schedule_name = cfg.parallel.pp_schedule
        self.modules = stages
        self.stages: list = []  # PipelineStages, made at the first step from its microbatch's shapes
        self._shapes: dict[str, torch.Size] = {}
        self.is_first = 0 in parts.indices
        self.is_last = parts.num_stages - 1 in parts.indices
        self.scale = 1.0
        self._schedules: dict[tuple[int, bool], object] = {}
        self._tied_groups = tied_groups(topology, [t.ranks for t in parts.tied])

    def _make_stages(self, microbatch: dict[str, torch.Tensor]) -> None:
        """Each of this rank's stages with the shapes it takes and returns (``stage_io``), and their check."""
        from torch.distributed.pipelining import PipelineStage

        shapes = {k: v.shape for k, v in microbatch.items()}
        if self.stages:
            if shapes != self._shapes:
                raise RuntimeError(f"pipeline microbatch shapes changed from {self._shapes} to {shapes}; the stages "
                                   "were given static shapes at the first step")
            return
        group = self.topology.group("pp")
        for module, index in zip(self.modules, self.parts.indices):
            inputs = outputs = None
            if self.static_shapes:
                inputs, outputs = stage_io(self.parts.holder, self.cfg, self.topology.tp, self.parts.ranges, index,
                                           microbatch)
                module.register_forward_hook(_check_output(index, outputs, self.cfg))
            self.stages.append(PipelineStage(module, index, self.parts.num_stages, self.topology.device,
                                             input_args=inputs, output_args=outputs, group=group))
        self._shapes = shapes

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
        self._make_stages(inputs[0])
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
        """Add up the copies' gradients of each tied tensor over the ranks holding one, so all take one update."""
        params = dict(model.named_parameters())
        for tied in self.parts.tied:
            if tied.name is None:
                continue
            p = params[tied.name]
            if p.grad is None:  # a copy no microbatch reached still takes part in the sum
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(grad, group=self._tied_groups[tied.ranks])


def tied_groups(topology: Topology, rank_sets: list[tuple[int, ...]]) -> dict[tuple[int, ...], object]:
    """For each set of pipeline ranks holding a tied tensor: the group of those ranks with this rank's data, context
    and tensor coordinates (every rank creates every group, in the same order; only this rank's are returned)."""
    mesh = topology.mesh.mesh  # [pp, dp, cp, tp] global ranks
    mine = {}
    for pp_ranks in dict.fromkeys(rank_sets):
        for d in range(topology.dp):
            for c in range(topology.cp):
                for t in range(topology.tp):
                    ranks = sorted({int(mesh[r, d, c, t]) for r in pp_ranks})
                    group = dist.new_group(ranks)
                    if topology.rank in ranks:
                        mine[pp_ranks] = group
    return mine
