"""A parallel layout (how many GPUs, how the model is split, which engine) and the per-rank parameter shapes it implies.

Tensor parallelism splits each module as the family's plan says (``parallel/plans.py``, the plan training applies):
column-parallel matrices (q, up, gate, the head; k and v when tp divides the kv heads) by output rows, row-parallel
ones (o, down) by input columns, and the vocabulary tables by rows; norms, row-parallel biases, learned position
tables and kv projections the group cannot split stay whole on every TP rank. (T5 uses Megatron's placements until
its family has a plan.) Pipeline parallelism gives stage ``i``
``L // pp`` layers plus one more for the first ``L % pp`` stages; the first stage holds the embeddings and the last the
final norm and output head (a tied head costs a second copy of the table on the last stage when pp > 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.params import Shape, decoder_layer_shapes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")  # zb: interleaved zero-bubble
INTERLEAVED = ("interleaved", "zb")  # schedules with several stages per rank
RECOMPUTE = ("none", "selective", "full")


@dataclass
class Layout:
    """Everything about a run that changes per-GPU memory and step time, apart from the model itself."""

    gpus: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    engine: str = "deepspeed"  # "deepspeed" (ZeRO 0-3) or "fsdp" (FSDP2, fully sharded)
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
    overhead_bytes: int = 1 << 30  # CUDA context, cuBLAS / NCCL workspaces

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

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
        return f"tp{self.tp} pp{self.pp} dp{self.dp} {eng} mb{self.micro_batch} {self.recompute}"

    def check_sizes(self) -> None:
        """The model-independent checks: every count is a positive integer and the overhead is not negative."""
        for name in ("gpus", "gpus_per_node", "tp", "pp", "micro_batch", "seq_len", "virtual_stages"):
            if getattr(self, name) <= 0:
                raise PlanError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("target_len", "global_batch"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PlanError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.overhead_bytes < 0:
            raise PlanError(f"--overhead-gib must be >= 0, got {self.overhead_bytes / 2**30:g}")

    def validate(self, spec: ModelConfig | EncDecSpec) -> None:
        """Raise ``PlanError`` with one line for a layout that cannot run this model."""
        self.check_sizes()
        if self.gpus % (self.tp * self.pp):
            raise PlanError(f"--gpus {self.gpus} is not divisible by tp*pp = {self.tp}*{self.pp}")
        heads = spec.num_heads
        kv = spec.kv_heads if isinstance(spec, ModelConfig) else heads
        if heads % self.tp or kv % self.tp:
            raise PlanError(f"--tp {self.tp} must divide the number of attention heads ({heads}) and kv heads ({kv})")
        layers = spec.num_layers
        if self.pp > layers:
            raise PlanError(f"--pp {self.pp} exceeds the number of layers ({layers})")
        if self.engine not in ("deepspeed", "fsdp"):
            raise PlanError(f"unknown engine '{self.engine}'; use deepspeed or fsdp")
        if not 0 <= self.zero <= 3:
            raise PlanError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.engine == "deepspeed" and self.tp > 1 and self.zero == 3:
            raise PlanError("ZeRO-3 with tensor parallelism is not supported (training refuses it); use --zero 1 or 2, "
                            "or --fsdp")
        if self.engine == "deepspeed" and self.pp > 1 and self.zero >= 2:
            raise PlanError(f"DeepSpeed's pipeline engine runs ZeRO 0/1 only, not --zero {self.zero} with --pp "
                            f"{self.pp}; use --fsdp with pipeline parallelism")
        if self.offload not in (None, "optimizer", "params"):
            raise PlanError(f"--offload must be optimizer or params, got {self.offload}")
        if self.offload == "params" and not self.sharded:
            raise PlanError("--offload params needs sharded parameters: --zero 3 or --fsdp")
        if self.offload == "optimizer" and self.engine == "deepspeed" and self.zero == 0:
            raise PlanError("DeepSpeed offloads the optimizer with ZeRO 1-3 only; add --zero 1, 2 or 3")
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute}")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule}")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype}")
        if self.global_batch is not None:
            if self.global_batch <= 0 or self.global_batch % (self.dp * self.micro_batch):
                raise PlanError(f"--global-batch {self.global_batch} must be a positive multiple of "
                                f"dp*micro_batch = {self.dp}*{self.micro_batch}")
        m = self.num_microbatches
        if self.global_batch is not None and self.pp > 1 and self.schedule == "1f1b" and m < self.pp:
            raise PlanError(f"1f1b with --pp {self.pp} needs at least {self.pp} microbatches per step, got {m}")
        if self.global_batch is not None and self.pp > 1 and self.schedule in INTERLEAVED and m % max(1, m // self.pp):
            raise PlanError(f"the interleaved schedule cannot run {m} microbatches in equal rounds of about "
                            f"--pp {self.pp}")
        if self.schedule in INTERLEAVED and self.pp > 1 and layers % (self.pp * self.virtual_stages):
            raise PlanError(f"interleaved schedule: {layers} layers do not split into pp*virtual_stages = "
                            f"{self.pp}*{self.virtual_stages} equal chunks")


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: as even as possible, earlier stages take the remainder."""
    return [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]


# The encoder-decoder family has no tensor-parallel plan of its own yet; these are the placements Megatron gives T5.
_T5_PLACEMENTS = {"q": "column", "k": "column", "v": "column", "wi": "column", "wi_0": "column", "wi_1": "column",
                  "o": "row", "wo": "row", "shared": "vocab", "lm_head": "vocab", "relative_attention_bias": "heads"}


def _placement(spec: ModelConfig | EncDecSpec, module: str) -> str | None:
    """How tensor parallelism splits ``module``: the family's plan (``parallel/plans.py``), the one training uses."""
    if isinstance(spec, EncDecSpec):
        return _T5_PLACEMENTS.get(module.rsplit(".", 1)[-1])
    from megatron_lite.parallel.plans import DECODER_PLAN

    return DECODER_PLAN.placement(module)


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


def stage_shapes(spec: ModelConfig | EncDecSpec, tp: int, pp: int, stage: int) -> list[tuple[str, Shape]]:
    """Named parameter shapes that one (TP rank, pipeline stage) holds."""
    if isinstance(spec, EncDecSpec):
        full = _encdec_stage(spec, pp, stage)
    else:
        full = _decoder_stage(spec, pp, stage)
    return [(n, _tp_slice(spec, n, s, tp)) for n, s in full]


def _decoder_stage(cfg: ModelConfig, pp: int, stage: int) -> list[tuple[str, Shape]]:
    counts = stage_layers(cfg.num_layers, pp)
    first = sum(counts[:stage])
    h, v = cfg.hidden_size, cfg.padded_vocab_size
    out: list[tuple[str, Shape]] = []
    if stage == 0:
        out.append(("embed.weight", (v, h)))
        if cfg.position == "learned":
            out.append(("pos_embed.weight", (cfg.max_seq_len, h)))
    for i in range(first, first + counts[stage]):
        out += decoder_layer_shapes(cfg, f"layers.{i}.")
    if stage == pp - 1:
        if cfg.norm_position == "pre":
            out.append(("final_norm.weight", (h,)))
            if cfg.norm == "layernorm" and cfg.bias:
                out.append(("final_norm.bias", (h,)))
        if not cfg.tie_embeddings or pp > 1:
            out.append(("lm_head.weight", (v, h)))
    return out


def _encdec_stage(spec: EncDecSpec, pp: int, stage: int) -> list[tuple[str, Shape]]:
    counts = stage_layers(spec.num_layers, pp)
    first = sum(counts[:stage])
    ne = spec.num_encoder_layers
    table = ("shared.weight", (spec.vocab_size, spec.d_model))
    out: list[tuple[str, Shape]] = [table] if stage == 0 else []
    for i in range(first, first + counts[stage]):
        if i < ne:
            out += spec.encoder_layer_shapes(i)
            if i == ne - 1:
                out.append(("encoder.final_layer_norm.weight", (spec.d_model,)))
        else:
            if i == ne and stage > 0:  # the decoder embeds its inputs with the shared table
                out.append(table)
            out += spec.decoder_layer_shapes(i - ne)
    if stage == pp - 1:
        out.append(("decoder.final_layer_norm.weight", (spec.d_model,)))
        if not spec.tie_embeddings or pp > 1:
            out.append(("lm_head.weight", (spec.vocab_size, spec.d_model)))
    return out
