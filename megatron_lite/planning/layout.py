"""A parallel layout (how many GPUs, how the model is split, which engine) and the per-rank parameter shapes it implies.

Tensor parallelism splits each module as the family's plan says (``parallel/plans.py``, the plan training applies):
column-parallel matrices (q, up, gate, the head; k and v when tp divides the kv heads) by output rows, row-parallel
ones (o, down) by input columns, and the vocabulary tables by rows; norms, row-parallel biases, learned position
tables, T5's relative-position tables (each rank computes its heads' share of the bias from the whole table) and kv
projections the group cannot split stay whole on every TP rank. Pipeline parallelism splits the blocks as training
does (``rank_layers``); the first stage holds the embeddings and the last the final norm and output head (a tied head
costs a second copy of the table on the last stage when pp > 1).

Expert parallelism (``ep``, mixture-of-experts decoders) splits the routed experts of every mixture layer over ep of
the data-parallel ranks (ep divides dp; it adds no ranks): each holds ``num_experts / ep`` experts whole, never split
by tensor parallelism (the model's plan names no expert module), and the router and shared experts as the plan places
them. The shapes listed for a rank are ep rank 0's experts (every ep rank holds as many).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.params import (
    Shape,
    decoder_block_params,
    decoder_layer_shapes,
    encdec_layer_shapes,
    encdec_part_shapes,
    moe_of,
)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")  # zb: interleaved zero-bubble
INTERLEAVED = ("interleaved", "zb")  # schedules with several stages per rank
RECOMPUTE = ("none", "selective", "full")  # what search enumerates
# ... and what a layout may name: "selective-op" is torchtitan's op-level policy (planning/memory.py), given to plan or
# compare with such runs; search leaves it out.
RECOMPUTE_POLICIES = RECOMPUTE + ("selective-op",)


@dataclass
class Layout:
    """Everything about a run that changes per-GPU memory and step time, apart from the model itself."""

    gpus: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    engine: str = "deepspeed"  # "deepspeed" (ZeRO 0-3) or "fsdp" (FSDP2, fully sharded)
    dp_replicate: int = 1  # FSDP2 as HSDP: replica groups, each sharding over dp / dp_replicate ranks
    cp: int = 1  # context parallelism: each sample's sequence split over cp ranks (they shard states like dp ranks)
    ep: int = 1  # expert parallelism: each mixture layer's experts split over ep of the dp ranks (ep divides dp)
    zero: int = 0
    offload: str | None = None  # None, "optimizer" or "params"
    micro_batch: int = 1
    seq_len: int = 1024
    target_len: int | None = None  # encoder-decoder: decoder length (default seq_len)
    global_batch: int | None = None  # samples per step; None: one microbatch per data-parallel rank
    recompute: str = "none"
    schedule: str = "1f1b"
    virtual_stages: int = 2  # interleaved schedule: model chunks per pipeline rank
    dtype: str = "bf16"
    sequence_parallel: bool = False
    flash_attention: bool = True
    persistence_threshold: int = 100_000  # ZeRO-3: tensors below this many elements stay whole on every rank
    prefetch_bucket: int = 50_000_000  # ZeRO-3: stage3_prefetch_bucket_size, elements gathered ahead
    max_live_parameters: int = 1_000_000_000  # ZeRO-3: stage3_max_live_parameters
    overhead_bytes: int = 1 << 30  # CUDA context, cuBLAS / NCCL workspaces

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp * self.cp)

    @property
    def data(self) -> int:
        """Ranks holding the same weights, over which gradients average and states shard: dp x cp."""
        return self.dp * self.cp

    @property
    def expert_data(self) -> int:
        """Ranks holding the same experts, over which expert gradients average and expert states shard:
        (dp / ep) x cp."""
        return max(self.data // self.ep, 1)

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded over data-parallel ranks (ZeRO-3 or FSDP)."""
        return self.engine == "fsdp" or self.zero == 3

    @property
    def num_microbatches(self) -> int:
        if self.global_batch is None:
            return 1
        return self.global_batch // (self.dp * self.micro_batch)

    def name(self) -> str:
        eng = "fsdp" if self.engine == "fsdp" else f"zero{self.zero}"
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        ep = f" ep{self.ep}" if self.ep > 1 else ""
        return f"tp{self.tp} pp{self.pp}{cp} dp{self.dp}{ep} {eng} mb{self.micro_batch} {self.recompute}"

    def check_sizes(self) -> None:
        """The model-independent checks: every count is a positive integer and the overhead is not negative."""
        for name in ("gpus", "gpus_per_node", "tp", "pp", "cp", "ep", "micro_batch", "seq_len", "virtual_stages"):
            if getattr(self, name) <= 0:
                raise PlanError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("target_len", "global_batch"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PlanError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.overhead_bytes < 0:
            raise PlanError(f"--overhead-gib must be >= 0, got {self.overhead_bytes / 2**30:g}")

    def validate(self, spec: ModelConfig | EncDecSpec) -> None:
        """Raise ``PlanError`` with one line for a layout that cannot run this model.

        The planner checks its own inputs here; whether training runs the layout is the engines' own config check
        (``planning.runnable.refusal``), so that the planner refuses exactly what training refuses.
        """
        from megatron_lite.planning.runnable import refusal

        self.check_sizes()
        if self.gpus % (self.tp * self.pp * self.cp):
            cp = f"*cp = {self.tp}*{self.pp}*{self.cp}" if self.cp > 1 else f" = {self.tp}*{self.pp}"
            raise PlanError(f"--gpus {self.gpus} is not divisible by tp*pp{cp}")
        if self.pp > spec.num_layers:
            raise PlanError(f"--pp {self.pp} exceeds the number of layers ({spec.num_layers})")
        if self.engine not in ("deepspeed", "fsdp"):
            raise PlanError(f"unknown engine '{self.engine}'; use deepspeed or fsdp")
        if self.dp_replicate < 1 or self.dp % self.dp_replicate:
            raise PlanError(f"--dp-replicate {self.dp_replicate} must divide the data-parallel size {self.dp}")
        if not 0 <= self.zero <= 3:
            raise PlanError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.offload not in (None, "optimizer", "params"):
            raise PlanError(f"--offload must be optimizer or params, got {self.offload}")
        if self.recompute not in RECOMPUTE_POLICIES:
            raise PlanError(f"--recompute must be one of {', '.join(RECOMPUTE_POLICIES)}, got {self.recompute}")
        if self.recompute == "selective-op" and isinstance(spec, EncDecSpec):
            raise PlanError("--recompute selective-op is a decoder policy (a block's matmuls in Llama order); "
                            "use none, selective or full for an encoder-decoder")
        if self.recompute == "selective-op" and moe_of(spec) is not None:
            raise PlanError("--recompute selective-op is a dense decoder policy (a block's matmuls in Llama order), "
                            "not modelled for mixture-of-experts layers; use none, selective or full")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule}")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype}")
        if self.global_batch is not None:
            if self.global_batch <= 0 or self.global_batch % (self.dp * self.micro_batch):
                raise PlanError(f"--global-batch {self.global_batch} must be a positive multiple of "
                                f"dp*micro_batch = {self.dp}*{self.micro_batch}")
        reason = refusal(spec, self)
        if reason:
            raise PlanError(f"training refuses {self.name()}: {reason}")
        self._check_experts(spec)

    def _check_experts(self, spec: ModelConfig | EncDecSpec) -> None:
        """What the planner's own arithmetic needs of ``ep`` (training's rules, asked first, may say more)."""
        if self.ep == 1:
            return
        moe = moe_of(spec)
        if moe is None:
            raise PlanError(f"--ep {self.ep} needs a mixture-of-experts model (model.moe.num_experts > 0)")
        if self.dp % self.ep:
            raise PlanError(f"--ep {self.ep} must divide the data-parallel size {self.dp} (the expert-parallel "
                            "group is carved from the data-parallel ranks)")
        if moe.num_experts % self.ep:
            raise PlanError(f"--ep {self.ep} must divide model.moe.num_experts={moe.num_experts}")


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: as even as possible, earlier stages take the remainder."""
    return [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]


_SPLITS: dict[tuple, list[list[int]]] = {}


def rank_layers(spec: ModelConfig | EncDecSpec, pp: int, layout: "Layout | None" = None) -> list[list[int]]:
    """The layer indices each pipeline rank holds.

    With a layout: training's own split (``parallel.pipeline.split_layers``: pp x v contiguous stages that balance
    parameters, the embedding counted on the first and the head on the last; an encoder-decoder's blocks, encoder
    first, each with its own count, the decoder's first with the embedding it needs; rank r holds stages r, r + pp,
    ...). Otherwise (no layout, or a split training would refuse): as even as possible.
    """
    if pp == 1:
        return [list(range(spec.num_layers))]
    even = stage_layers(spec.num_layers, pp)
    fallback = [list(range(sum(even[:r]), sum(even[:r + 1]))) for r in range(pp)]
    if layout is None:
        return fallback
    v = layout.virtual_stages if layout.schedule in INTERLEAVED else 1
    h, vocab = spec.hidden_size, spec.padded_vocab_size
    first = vocab * h + (spec.max_seq_len * h if spec.position == "learned" else 0)
    norm = (h * (2 if spec.norm == "layernorm" and spec.bias else 1)) if spec.norm_position == "pre" else 0
    last = norm + vocab * h  # the head module, tied or not (split_model counts its parameters either way)
    model: dict = {"num_layers": spec.num_layers}
    data: dict = {}
    if isinstance(spec, EncDecSpec):
        sizes = [sum(math.prod(s) for _, s in encdec_layer_shapes(spec, i)) for i in range(spec.num_layers)]
        sizes[spec.num_encoder_layers] += first  # the stage running the decoder's first block embeds its inputs
        block: int | tuple[int, ...] = tuple(sizes)
        model = {"family": "encoder_decoder", "num_layers": spec.num_encoder_layers,
                 "num_decoder_layers": spec.num_decoder_layers}
        data = {"objective": "seq2seq"}
    else:
        sizes = decoder_block_params(spec)  # every expert of a mixture block: training balances the whole model
        block = sizes[0] if len(set(sizes)) == 1 else tuple(sizes)
    key = (spec.num_layers, pp, v, block, first, last)
    if key not in _SPLITS:
        from megatron_lite.config import ConfigError, config_from_dict
        from megatron_lite.parallel.pipeline import split_layers

        cfg = config_from_dict({"model": model, "data": data,
                                "parallel": {"pp": pp, "pp_schedule": "interleaved" if v > 1 else "1f1b",
                                             "pp_virtual_stages": v}})
        try:
            ranges = split_layers(cfg, list(block) if isinstance(block, tuple) else block, first, last)
        except ConfigError:
            return fallback
        _SPLITS[key] = [sorted(i for st, r in enumerate(ranges) if st % pp == rank for i in r) for rank in range(pp)]
    return _SPLITS[key]


def _placement(spec: ModelConfig | EncDecSpec, module: str) -> str | None:
    """How tensor parallelism splits ``module``: the model's own plan (``TP_PLAN``), the one training applies."""
    from megatron_lite.models import model_class
    from megatron_lite.parallel.plans import plan_of

    return plan_of(model_class("encoder_decoder" if isinstance(spec, EncDecSpec) else "decoder")).placement(module)


def _tp_slice(spec: ModelConfig | EncDecSpec, name: str, shape: Shape, tp: int) -> Shape:
    """The shape one TP rank holds of a full tensor."""
    if tp == 1:
        return shape
    module, _, kind = name.rpartition(".")
    placement = _placement(spec, module)
    if placement == "kv":  # split when tp divides the kv heads, else replicated on every rank
        placement = "column" if spec.kv_heads % tp == 0 else None
    if placement == "vocab" or (placement == "column" and kind in ("weight", "bias")):
        return (math.ceil(shape[0] / tp),) + shape[1:]
    if placement == "row" and kind == "weight":
        return (shape[0], shape[1] // tp)
    if placement == "heads":
        return (shape[0], shape[1] // tp)
    return shape


def stage_shapes(spec: ModelConfig | EncDecSpec, tp: int, pp: int, stage: int,
                 layout: "Layout | None" = None) -> list[tuple[str, Shape]]:
    """Named parameter shapes that one (TP rank, pipeline rank) holds; with ``layout``, of training's own split and
    with its expert parallelism (ep rank 0's ``num_experts / ep`` experts of each mixture layer)."""
    layers = rank_layers(spec, pp, layout)[stage]
    if isinstance(spec, EncDecSpec):
        full = _encdec_stage(spec, pp, stage, layers)
    else:
        full = _decoder_stage(spec, pp, stage, layers, layout.ep if layout is not None else 1)
    return [(n, _tp_slice(spec, n, s, tp)) for n, s in full]


def _decoder_stage(cfg: ModelConfig, pp: int, stage: int, layers: list[int], ep: int = 1) -> list[tuple[str, Shape]]:
    h, v = cfg.hidden_size, cfg.padded_vocab_size
    experts = range(cfg.moe.num_experts // ep) if cfg.moe.enabled else None
    out: list[tuple[str, Shape]] = []
    if stage == 0:
        out.append(("embed.weight", (v, h)))
        if cfg.position == "learned":
            out.append(("pos_embed.weight", (cfg.max_seq_len, h)))
    for i in layers:
        out += decoder_layer_shapes(cfg, f"layers.{i}.", i, experts)
    if stage == pp - 1:
        if cfg.norm_position == "pre":
            out.append(("final_norm.weight", (h,)))
            if cfg.norm == "layernorm" and cfg.bias:
                out.append(("final_norm.bias", (h,)))
        if not cfg.tie_embeddings or pp > 1:
            out.append(("lm_head.weight", (v, h)))
    return out


def _encdec_stage(spec: EncDecSpec, pp: int, stage: int, layers: list[int]) -> list[tuple[str, Shape]]:
    """What a rank running blocks ``layers`` uses besides them, as training's split gives it: the shared table where
    a stack's input is embedded (the first rank, and the one with the decoder's first block), each stack's
    relative-position table wherever its blocks run, the encoder's final norm with its last block, and on the last
    rank the final norm and the head (a tied head is a copy of the table there unless that rank embeds too)."""
    ne = spec.num_encoder_layers
    part = functools.partial(encdec_part_shapes, spec)
    embeds = stage == 0 or ne in layers
    out: list[tuple[str, Shape]] = part("embed") if embeds else []
    if any(i < ne for i in layers):
        out += part("encoder_top")
    if any(i >= ne for i in layers):
        out += part("decoder_top")
    for i in layers:
        out += encdec_layer_shapes(spec, i)
    if ne - 1 in layers:
        out += part("encoder_end")
    if stage == pp - 1:
        out += part("decoder_end")
        if not spec.tie_embeddings or not embeds:
            out.append(("lm_head.weight", (spec.padded_vocab_size, spec.d_model)))
    return out
