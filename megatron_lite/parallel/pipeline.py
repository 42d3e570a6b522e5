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

**Schedules** come from ``torch.distributed.pipelining`` (GPipe, 1F1B, interleaved 1F1B, interleaved zero-bubble),
built by hand from ``PipelineStage``: no schedule is written here. Their loss is the shared step's token-weighted one:
each microbatch's summed token loss times ``dp / global tokens``, with ``scale_grads=False``.

**Encoder-decoders.** The blocks run in index order, encoder blocks first, so encoder stages come first, then decoder
stages (a stage may hold the end of one stack and the start of the other). An encoder stage passes its hidden states
on; from the encoder's last block on, every stage passes ``(hidden, encoder output)``, so that each decoder stage can
cross-attend, and the encoder output's gradient flows back along the same path. Decoder input ids and padding masks
reach every stage as keyword arguments. A stage is an :class:`EncoderDecoderStage` over the view, which runs its
slice of the stacks with the model's own pieces (``embed_tokens``, ``encoder_context``, ``decoder_context``,
``finish_encoder``, ``head``). T5's relative bias is recomputed on every stage that runs blocks of a stack, from that
stage's copy of the stack's bias table (a tied tensor, below), rather than sent as an activation: the table is
buckets x heads numbers while the bias is heads x s x s per microbatch, the same for every microbatch, and
recomputing it keeps each stage's forward the model's own code, with a gradient sum that equals one process's.

**Tied copies.** A tensor that stages on several pipeline ranks use (a decoder's tied embedding and head; an
encoder-decoder's shared embedding on the encoder's first stage, the decoder's first stage and a tied head; a bias
table whose stack spans stages) is one copy per rank, initialized from the same name, whose gradients are summed
over those ranks before every optimizer step, so that all receive the same update and stay bit-identical. The
gradient norm counts the copies once, and the optimizer state is saved once, under the tensor's first name.
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


def num_blocks(cfg: Config) -> tuple[int, str]:
    """The model's blocks, and the config keys that count them (an encoder-decoder's encoder and decoder)."""
    m = cfg.model
    if m.family == "encoder_decoder":
        n = m.num_layers + m.decoder_layers
        return n, f"model.num_layers + num_decoder_layers={n}"
    return m.num_layers, f"model.num_layers={m.num_layers}"


def split_layers(cfg: Config, block_params: int | list[int], first_params: int, last_params: int) -> list[range]:
    """The blocks of each of the ``pp x v`` stages: ``parallel.pp_layers`` when given, else contiguous runs that keep
    the largest stage's parameter count (blocks, plus the embedding on the first and the head on the last) smallest.
    ``block_params`` is every block's count (encoder and decoder blocks differ), or one count for all."""
    par = cfg.parallel
    layers, key = num_blocks(cfg)
    stages = par.pp * virtual_stages(cfg)
    if par.pp_layers is not None:
        counts = list(par.pp_layers)
        if len(counts) != stages or any(not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != layers:
            raise ConfigError(
                f"parallel.pp_layers={counts} must give {stages} positive layer counts (parallel.pp={par.pp} x "
                f"{virtual_stages(cfg)} stages per rank) that add up to {key}"
            )
    else:
        if stages > layers:
            raise ConfigError(
                f"{stages} pipeline stages (parallel.pp={par.pp} x {virtual_stages(cfg)} per rank) for "
                f"{key}: every stage needs at least one layer"
            )
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


def check_pipeline(cfg: Config, dp: int) -> None:
    """Refuse schedules that cannot run this step, in one line naming the key."""
    par = cfg.parallel
    if par.pp == 1:
        return
    if par.pp_virtual_stages < 1:
        raise ConfigError(f"parallel.pp_virtual_stages={par.pp_virtual_stages} must be positive")
    if par.pp_schedule == "zb" and cfg.model.family == "encoder_decoder":
        raise ConfigError(
            "parallel.pp_schedule=zb is not supported for model.family=encoder_decoder (torch's split input/weight "
            "backward fails on its stages, which take the encoder output): use 1f1b, gpipe or interleaved"
        )
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
    layers, key = num_blocks(cfg)
    if stages > layers and par.pp_layers is None:
        raise ConfigError(
            f"{stages} pipeline stages (parallel.pp={par.pp} x {virtual_stages(cfg)} per rank) for "
            f"{key}: every stage needs at least one layer"
        )


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

    @property
    def copies(self) -> dict[str, int]:
        """This rank's name of each tied tensor -> how many pipeline ranks hold a copy (the gradient norm's divisor)."""
        return {t.name: len(t.ranks) for t in self.tied if t.name is not None}

    @property
    def replicas(self) -> list[str]:
        """This rank's tied copies that a gradient norm must skip (another rank's copy counts for them)."""
        return [t.name for t in self.tied if t.name is not None and not t.primary]


FIRST_PARTS = ("embed", "pos_embed")  # parts of the first stage and of the last (decoder family)
LAST_PARTS = ("final_norm", "lm_head")
ENCODER_DECODER_PARTS = ("embed", "pos_embed", "encoder_pos_bias", "decoder_pos_bias", "encoder_norm", "final_norm",
                         "lm_head")


def _is_encoder_decoder(model: nn.Module) -> bool:
    from megatron_lite.models.encoder_decoder import EncoderDecoderLM

    return isinstance(model, EncoderDecoderLM)


def _stage_parts(model: nn.Module, layers: range, first: bool, last: bool) -> set[str]:
    """The parts besides blocks that a stage running ``layers`` uses (each stack's input embedding and bias table,
    the encoder's final norm, the head)."""
    if not _is_encoder_decoder(model):
        return {*(FIRST_PARTS if first else ()), *(LAST_PARTS if last else ())}
    e = model.num_encoder_layers
    parts = set()
    if first or e in layers:  # embeds the encoder's input, or the decoder's
        parts |= {"embed", "pos_embed"}
    if layers.start < e:
        parts.add("encoder_pos_bias")
    if layers.stop > e:
        parts.add("decoder_pos_bias")
    if layers.start < e <= layers.stop:  # runs the encoder's last block
        parts.add("encoder_norm")
    if last:
        parts |= set(LAST_PARTS)
    return parts


def _removable(model: nn.Module) -> tuple[str, ...]:
    return ENCODER_DECODER_PARTS if _is_encoder_decoder(model) else FIRST_PARTS + LAST_PARTS


def _params(model: nn.Module, names) -> int:
    return sum(p.numel() for name in names if getattr(model, name, None) is not None
               for p in getattr(model, name).parameters())


def split_model(model: nn.Module, cfg: Config, topology: Topology) -> PipelineParts:
    """Cut the (meta) model into this rank's holder and stage views; see the module docstring."""
    pp, rank = topology.pp, topology.pp_rank
    sizes = [sum(p.numel() for p in block.parameters()) for block in model.layers.values()]
    if _is_encoder_decoder(model):  # whichever stage runs the decoder's first block holds a copy of the embedding
        sizes[model.num_encoder_layers] += _params(model, FIRST_PARTS)
    ranges = split_layers(cfg, sizes, _params(model, FIRST_PARTS), _params(model, LAST_PARTS))
    num_stages = len(ranges)
    parts = [_stage_parts(model, r, s == 0, s == num_stages - 1) for s, r in enumerate(ranges)]
    holders = _holding_ranks(model, ranges, parts, pp)
    if cfg.parallel.engine == "fsdp":
        _check_one_root_per_tensor(model, ranges, parts, cfg)
    indices = [s for s in range(num_stages) if s % pp == rank]
    mine = {str(i) for s in indices for i in ranges[s]}
    for key in [k for k in model.layers if k not in mine]:
        del model.layers[key]
    kept = set().union(*(parts[s] for s in indices))
    for name in _removable(model):
        if name not in kept:
            setattr(model, name, None)
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    tied = [TiedCopies(ranks, names.get(pid), ranks[0] == rank) for pid, ranks in holders]
    stages = [_view(model, ranges[s], parts[s]) for s in indices]
    return PipelineParts(model, stages, indices, num_stages, tied)


def _holding_ranks(model: nn.Module, ranges: list[range], parts: list[set[str]],
                   pp: int) -> list[tuple[int, tuple[int, ...]]]:
    """(id, holding pipeline ranks) of every tensor that stages on more than one rank use, in the whole model's
    parameter order (the same on every rank, so that every rank builds the same groups and sums in the same order)."""
    ranks: dict[int, set[int]] = {}
    for s, (layers, used) in enumerate(zip(ranges, parts)):
        modules = [model.layers[str(i)] for i in layers]
        modules += [getattr(model, n) for n in sorted(used) if getattr(model, n, None) is not None]
        for module in modules:
            for p in module.parameters():
                ranks.setdefault(id(p), set()).add(s % pp)
    order = [id(p) for p in model.parameters()]
    return [(pid, tuple(sorted(ranks[pid]))) for pid in order if len(ranks.get(pid, ())) > 1]


def _check_one_root_per_tensor(model: nn.Module, ranges: list[range], parts: list[set[str]], cfg: Config) -> None:
    """FSDP2 makes each stage a root that owns the parameters outside its blocks, so no tensor may be used by two
    stages of one rank (an encoder-decoder's embedding when the encoder's and the decoder's first stages share a
    rank); checked for every rank alike, so that all of them refuse."""
    pp, seen = cfg.parallel.pp, {}
    for s, used in enumerate(parts):
        for name in sorted(used):
            module = getattr(model, name, None)
            for p in module.parameters() if module is not None else ():
                first = seen.setdefault((id(p), s % pp), s)
                if first != s:
                    raise ConfigError(
                        f"parallel.engine=fsdp with parallel.pp_schedule={cfg.parallel.pp_schedule}: pipeline stages "
                        f"{first} and {s} (blocks {ranges[first].start}-{ranges[first].stop - 1} and "
                        f"{ranges[s].start}-{ranges[s].stop - 1}) share {name} on pipeline rank {s % pp}, which FSDP2 "
                        "cannot shard in two stage roots; use parallel.pp_layers that keep them on different ranks, "
                        "parallel.pp_schedule=1f1b or gpipe, or parallel.engine=ddp or deepspeed"
                    )


def _view(holder: nn.Module, layers: range, parts: set[str]) -> nn.Module:
    """A stage: a shallow copy of the holder that runs only ``layers`` and the ``parts`` they need (an
    encoder-decoder's inside an :class:`EncoderDecoderStage`)."""
    view = copy.copy(holder)
    view._modules = dict(holder._modules)
    view._parameters = dict(holder._parameters)
    view._buffers = dict(holder._buffers)
    view.layers = nn.ModuleDict({str(i): holder.layers[str(i)] for i in layers})
    for name in _removable(holder):
        if name not in parts:
            setattr(view, name, None)
    return EncoderDecoderStage(view, layers) if _is_encoder_decoder(holder) else view


class EncoderDecoderStage(nn.Module):
    """Blocks ``layers`` of an encoder-decoder view, fed what the stage before sent.

    Inputs by position: source ids (the first stage), encoder hidden states (an encoder stage), or
    ``(decoder hidden states, encoder output)`` (a decoder stage; a stage starting at the first decoder block gets
    the encoder output alone). Outputs: the next stage's inputs, or the logits on the last stage.
    """

    def __init__(self, model: nn.Module, layers: range) -> None:
        super().__init__()
        self.model = model
        self.start, self.stop = layers.start, layers.stop
        self.encoder_layers = model.num_encoder_layers
        self.last = layers.stop == model.num_encoder_layers + model.cfg.decoder_layers

    def forward(self, *acts: torch.Tensor, decoder_input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                decoder_padding_mask: torch.Tensor | None = None):
        m, e = self.model, self.encoder_layers
        x, memory = acts[0], (acts[1] if len(acts) > 1 else None)
        if self.start < e:
            if self.start == 0:
                x = m.embed_tokens(x)
            mask, bias = m.encoder_context(x.shape[1], padding_mask, x.device)
            for i in range(self.start, min(self.stop, e)):
                x = m.layers[str(i)](x, mask, bias)
            if self.stop < e:
                return x
            memory = m.finish_encoder(x)
            if self.stop == e:
                return memory
        elif self.start == e:
            memory = x
        if self.start <= e:
            x = m.embed_tokens(decoder_input_ids)
        mask, memory_mask, bias = m.decoder_context(decoder_input_ids.shape[1], padding_mask, decoder_padding_mask,
                                                    x.device)
        for i in range(max(self.start, e), self.stop):
            x = m.layers[str(i)](x, memory, mask, memory_mask, bias)
        if self.last:
            return m.head(x)
        # A received encoder output goes on as a new tensor, not the input itself or a view of it: the schedules
        # free a stage's outputs after its backward by detaching them in place.
        return x, (memory if memory.grad_fn is not None else memory.clone())


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
        self._tied_groups = tied_groups(topology, [t.ranks for t in parts.tied])

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
    """For each set of pipeline ranks holding a tied tensor: the group of those ranks with this rank's data and
    tensor coordinates (every rank creates every group, in the same order; only this rank's are returned)."""
    mesh = topology.mesh.mesh  # [pp, dp, tp] global ranks
    mine = {}
    for pp_ranks in dict.fromkeys(rank_sets):
        for d in range(topology.dp):
            for t in range(topology.tp):
                ranks = sorted({int(mesh[r, d, t]) for r in pp_ranks})
                group = dist.new_group(ranks)
                if topology.rank in ranks:
                    mine[pp_ranks] = group
    return mine
