"""Per-GPU memory of a training layout: model states per engine, activations (Korthikanti et al.), overhead.

Model states are computed tensor by tensor from the shapes one rank holds (``layout.stage_shapes``), so that the
sharding and padding rules of each engine are reproduced exactly. With AdamW (two fp32 moments) and the parameter
groups of ``step/optim.py`` (decay; no decay for embeddings, biases and 1-D tensors):

DeepSpeed, ZeRO 0 (fp32): parameters, their .grad and the moments, all whole: 4 + 4 + 8 bytes per parameter.
  With bf16/fp16: 2 + 2 + 12 (low-precision weights and grads, fp32 master copy and moments; ZeRO paper accounting).
DeepSpeed, ZeRO 1/2: each parameter group is flattened into one buffer padded to a multiple of 2*dp elements
  (``nccl_start_alignment_factor``) and split into dp equal partitions. Weights: the whole padded flat buffer in the
  training dtype. Optimizer: an fp32 copy of this rank's partition (made even when training in fp32), its two moments,
  and one 4-byte step counter per group. Gradients: this rank's partition, in the training dtype; DeepSpeed's
  stage 1 shares stage 2's bucketed reduction, so at the optimizer step both hold only the partition (measured).
DeepSpeed, ZeRO 3: each tensor is split into ceil(numel/dp)-element partitions; tensors below the persistence
  threshold (1e5 elements by default) also stay whole on every rank. Gradients: the partitions. Optimizer: fp32
  partitions, moments, and a step counter per group. Gathered while it runs: the largest module with its gradient,
  plus the prefetch bucket (``stage3_prefetch_bucket_size``), capped at ``stage3_max_live_parameters``.
FSDP2 (``fully_shard``): each tensor is split along dim 0 into dp chunks of ceil(d0/dp) rows (under HSDP, into
  dp / dp_replicate chunks in each replica group; rank 0, the most loaded,
  holds a full chunk); parameters stay fp32 in the shard (the mixed-precision policy casts the gathered copy),
  gradients are fp32 shards, and torch AdamW keeps two moments and a 4-byte step counter per tensor.
Gradient accumulation (m = global_batch / (dp * micro_batch) > 1) changes what two engines hold while the microbatches
  of a step run, and the estimate takes that peak (measured on 2 CPU ranks, see docs/plan.md): DeepSpeed ZeRO 1
  reduces only at the accumulation boundary, so every rank accumulates the whole gradients in ``.grad`` (p bytes per
  parameter) until the last backward; FSDP2 here skips the reduce-scatter on all but the last microbatch
  (``set_requires_gradient_sync``), and FSDP2 then accumulates *unsharded* gradients in the reduce dtype (fp32: 4
  bytes per parameter of the rank's TP/PP slice). ZeRO 2/3 reduce every microbatch and keep only the partition.
The optimizer step (``step_gradients``): DeepSpeed hands the optimizer an fp32 gradient it makes for the step: of
  each parameter group's partition in turn (ZeRO 1/2), of each sub-group (at most ``sub_group_size`` = 1e9 elements,
  ZeRO 3), of every parameter (ZeRO 0's unfused optimizer in bf16/fp16). It lives only during the step, after the
  activations and the gathered ZeRO-3/FSDP parameters are freed, so the estimate takes the larger of two peaks: the
  last backward and the optimizer step, and says which (``peak_phase``).
Offload (DeepSpeed 0.19; measured on 2 CPU ranks): with the optimizer offloaded, ZeRO 1/2 copy each reduced gradient
  into the fp32 gradient of the host partition, and keep a 16-bit host copy of the partition for the updated
  weights; ZeRO 3 allocates its gradient partition buffer on the host too, beside an fp32 gradient per sub-group. The
  GPU keeps the 16-bit weights (ZeRO 1/2: all of them; ZeRO 3: the partition and the persistent tensors; with
  ``params`` only the persistent ones). FSDP2's CPU offload (``params``) keeps the fp32 shards, their gradients and
  the AdamW states on the host. All of it is reported under ``cpu`` (per GPU; ``cpu_bytes_per_node`` per node).
Expert parallelism (``ep`` > 1, mixture-of-experts decoders): a rank holds ``num_experts / ep`` routed experts of each
  mixture layer. FSDP2 shards their weights, gradients and optimizer states over the ``expert_data`` = (dp / ep) x cp
  ranks that hold the same experts (each expert a unit of its own); DeepSpeed (ZeRO 1-2) keeps them out of ZeRO,
  whole, with their own AdamW (fp32 masters and moments). The dense parameters (attention, norms, router, shared
  experts, embeddings) are planned as before (``rank_state_bytes``).
"""

from __future__ import annotations

import dataclasses
import math

from megatron_lite.config import ModelConfig, OptimizerConfig
from megatron_lite.planning.encdec import EncDecSpec, as_spec
from megatron_lite.planning.layout import DTYPE_BYTES, Layout, rank_layers, stage_shapes
from megatron_lite.planning.params import EMBEDDING_NAMES, EXPERT_MARK, Shape, is_expert, is_moe_layer

ModelSpec = ModelConfig | EncDecSpec
ALIGNMENT = 2  # DeepSpeed ZeRO 1/2: nccl_start_alignment_factor
# The cross-entropy on fp32 logits (``step/loss.py``) peaks as its backward begins: the log-softmax output it saved,
# the gradient arriving for it and the gradient it returns, three fp32 tensors of the logits' size (the 16-bit logits
# are freed once cast). 4 bytes per logit (the fp32 copy only) left out two of them.
LOSS_LOGIT_BYTES = 12
SUB_GROUP = 1_000_000_000  # DeepSpeed ZeRO 3: default sub_group_size (elements per fp32 flat sub-group)


def param_groups(shapes: list[tuple[str, Shape]]) -> list[list[tuple[str, Shape]]]:
    """Split shapes into the optimizer's (decay, no-decay) groups, in model order; empty groups are dropped."""
    rule = OptimizerConfig()
    decay, no_decay = [], []
    for name, shape in shapes:
        skip = rule.skips_weight_decay(name, len(shape), embedding=name in EMBEDDING_NAMES)
        (no_decay if skip else decay).append((name, shape))
    return [g for g in (decay, no_decay) if g]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def rank_state_bytes(shapes: list[tuple[str, Shape]], layout: Layout) -> dict[str, int]:
    """``model_state_bytes`` of a rank's shapes under expert parallelism (ep > 1), the routed experts apart from the
    rest, which is planned as without experts (sharded over all data ranks):

    - FSDP2 makes each expert a unit of its own over the ``expert_data`` ranks that hold it (``engines/fsdp.py``):
      expert states shard over those ranks;
    - DeepSpeed (ZeRO 1-2, the stages training runs ep with) keeps the experts out of ZeRO (``engines/deepspeed.py``):
      whole on every rank that holds them, with a torch AdamW of their own, fp32 masters where the weights are not
      fp32, and their fp32 gradients at the step, counted as ZeRO 0 counts parameters.

    The two add up, the fp32 gradients at the step too: the experts' live through DeepSpeed's step of the dense part.
    """
    experts = [(n, s) for n, s in shapes if is_expert(n)]
    if layout.ep == 1 or not experts:
        return model_state_bytes(shapes, layout)
    dense = model_state_bytes([(n, s) for n, s in shapes if not is_expert(n)], layout)
    if layout.engine == "deepspeed":
        routed = model_state_bytes(experts, dataclasses.replace(layout, zero=0, offload=None))
    else:
        routed = model_state_bytes(experts, layout, data=layout.expert_data)
    return {key: dense[key] + routed[key] for key in dense}


def model_state_bytes(shapes: list[tuple[str, Shape]], layout: Layout, data: int | None = None) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer states that one rank holds (see the module docstring).

    ``step_gradients``: the fp32 gradient copy the optimizer step makes on the GPU (one group or sub-group at a time),
    live only during the step. ``cpu``: what offload keeps in host memory for this rank. ``data``: the ranks the
    states shard over (default ``layout.data``, dp x cp; a routed expert's: ``layout.expert_data``).
    """
    p = DTYPE_BYTES[layout.dtype]
    dp = layout.data if data is None else data  # context-parallel ranks hold the same weights: dp x cp
    groups = param_groups(shapes)
    total = sum(_numel(s) for _, s in shapes)
    accumulating = layout.num_microbatches > 1
    step = cpu = 0
    if layout.engine == "fsdp":
        shards = max(dp // layout.dp_replicate, 1)
        local = sum(math.ceil(s[0] / shards) * _numel(s[1:]) for _, s in shapes)
        w, g, o = 4 * local, 4 * (total if accumulating else local), 8 * local + 4 * len(shapes)
        if layout.offload == "params":  # CPUOffloadPolicy: sharded weights, gradients and AdamW states on the host
            cpu = w + 4 * local + o
            w, o = 0, 0
            g = 4 * total if accumulating else 0
    elif layout.zero == 0:
        w, g = p * total, p * total
        o = 8 * total + 4 * len(shapes) + (4 * total if p != 4 else 0)
        step = 4 * total if p != 4 else 0  # the unfused optimizer's fp32 copy of every gradient
    elif layout.zero in (1, 2):
        align = ALIGNMENT * dp
        padded = [math.ceil(sum(_numel(s) for _, s in grp) / align) * align for grp in groups]
        part = sum(n // dp for n in padded)
        w = p * sum(padded)
        g = p * (total if layout.zero == 1 and accumulating else part)
        o = 12 * part + 4 * len(groups)
        step = 4 * max(n // dp for n in padded)  # flattened to fp32 for the step, one group at a time
        if layout.offload:
            # The reduced gradients go straight into the fp32 gradient of the host partition; the host also holds
            # the fp32 master, the moments and a 16-bit copy of the partition the updated weights return through.
            cpu = o + 4 * part + p * part
            o, step = 0, 0
            g = p * total if layout.zero == 1 and accumulating else 0
    else:
        parts = [sum(math.ceil(_numel(s) / dp) for _, s in grp) for grp in groups]
        part = sum(parts)
        persistent = sum(_numel(s) for _, s in shapes if _numel(s) < layout.persistence_threshold)
        w = p * (part + persistent)
        g = p * part
        o = 12 * part + 4 * sum(math.ceil(n / SUB_GROUP) for n in parts)
        step = 4 * max(min(n, SUB_GROUP) for n in parts)  # one sub-group's fp32 gradient at a time
        if layout.offload:
            # Offloading the optimizer moves the gradient partition buffer to the host as well, beside a persistent
            # fp32 gradient per sub-group; offloading parameters moves the 16-bit partitions (not the persistent).
            cpu = o + g + 4 * part
            o, g, step = 0, 0, 0
            if layout.offload == "params":
                cpu += p * part
                w = p * persistent
    return {"weights": w, "gradients": g, "optimizer": o, "step_gradients": step, "cpu": cpu}


# ----------------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------------


def _block_bytes(layout: Layout, s_q: int, s_kv: int, b: int, h: int, q_dim: int, kv_dim: int, heads: int,
                 attn_dropout: bool, resid_dropout: bool, stored_scores: bool) -> tuple[float, float]:
    """(replicated, TP-sharded) bytes of one attention sub-block, Korthikanti et al. 2022, Section 4.1.

    Replicated on TP ranks (unless sequence parallel): the norm input and the QKV projection input (s*b*h values each),
    a residual-dropout mask (1 byte per value). Sharded: Q and the output-projection input (s*b*q_dim each), K and V
    (s_kv*b*kv_dim each), the softmax output (heads*s_q*s_kv*b) with its dropout mask and output when attention
    dropout is on; with flash attention (or recomputed scores) only a float32 log-sum-exp per query and head.
    """
    p = DTYPE_BYTES[layout.dtype]
    rep = 2 * s_q * b * h * p + (s_q * b * h if resid_dropout else 0)
    shard = (2 * s_q * b * q_dim + 2 * s_kv * b * kv_dim) * p
    if stored_scores:
        scores = heads * s_q * s_kv * b
        shard += scores * p + (scores * (1 + p) if attn_dropout else 0)
    else:
        shard += 4 * heads * s_q * b
    return rep, shard


def _mlp_bytes(layout: Layout, s: int, b: int, h: int, f: int, gated: bool, resid_dropout: bool) -> tuple[float, float]:
    """(replicated, sharded) bytes of the MLP sub-block: norm and first-linear inputs (replicated), a dropout mask,
    and 2 (plain: activation input and output) or 4 (gated: gate, up, act(gate), product) s*b*f tensors."""
    p = DTYPE_BYTES[layout.dtype]
    rep = 2 * s * b * h * p + (s * b * h if resid_dropout else 0)
    shard = (4 if gated else 2) * s * b * f * p
    return rep, shard


def _moe_bytes(spec: ModelConfig, layout: Layout, s: int, b: int, resid_dropout: bool) -> tuple[float, float]:
    """(replicated, sharded) bytes of a mixture-of-experts sub-block, all of it replicated on TP ranks (no expert is
    split by tensor parallelism): the norm and router inputs, a dropout mask, the fp32 router logits and
    probabilities; per routed copy of a token (top_k per token, on whichever rank holds its expert: dropless routing
    over balanced experts brings each rank as many as it sends) the expert's input and output rows and its gate, up,
    act(gate) and product; the shared experts as a SwiGLU MLP of their width, and their output when gated."""
    p = DTYPE_BYTES[layout.dtype]
    moe, h, f = spec.moe, spec.hidden_size, spec.expert_ffn_size
    tokens = s * b
    rep = 2 * tokens * h * p + (tokens * h if resid_dropout else 0)
    rep += 2 * 4 * tokens * moe.num_experts
    rep += tokens * moe.top_k * (2 * h + 4 * f) * p
    if moe.shared_experts:
        rep += 4 * tokens * moe.shared_experts * f * p + (tokens * h * p if moe.shared_expert_gate else 0)
    return rep, 0.0


def layer_activation_bytes(spec: ModelSpec, layout: Layout, decoder_layer: bool = True, moe: bool = False) -> float:
    """Bytes one layer keeps for backward for one microbatch, on one TP rank, before recomputation; ``moe``: a
    decoder's mixture-of-experts layer (``_moe_bytes`` in place of the MLP).

    For a GPT-3 style layer (MHA, 4h GELU MLP, dropout, no flash) this is Korthikanti's s*b*h*(34 + 5*a*s/h) at 16 bits,
    s*b*h*(10 + 24/t + 5*a*s/(h*t)) with tensor parallelism and s*b*h/t*(34 + 5*a*s/h) with sequence parallelism.
    """
    t = layout.tp
    b = layout.micro_batch
    scores = not layout.flash_attention and layout.recompute == "none"
    if isinstance(spec, EncDecSpec):
        s_enc, s_dec = layout.seq_len, layout.target_len or layout.seq_len
        h, inner, a = spec.d_model, spec.inner_dim, spec.num_heads
        parts = []
        if decoder_layer:
            parts.append(_block_bytes(layout, s_dec, s_dec, b, h, inner, inner, a, True, True, scores))
            parts.append(_block_bytes(layout, s_dec, s_enc, b, h, inner, inner, a, True, True, scores))
            parts.append(_mlp_bytes(layout, s_dec, b, h, spec.d_ff, spec.gated, True))
        else:
            parts.append(_block_bytes(layout, s_enc, s_enc, b, h, inner, inner, a, True, True, scores))
            parts.append(_mlp_bytes(layout, s_enc, b, h, spec.d_ff, spec.gated, True))
    else:
        s, h, d = layout.seq_len, spec.hidden_size, spec.head_dim
        attn_do, resid_do = spec.attention_dropout > 0, spec.residual_dropout > 0
        q = s // layout.cp  # context parallelism: this rank's queries; its keys and values are gathered whole
        parts = [
            _block_bytes(layout, q, s, b, h, spec.num_heads * d, spec.kv_heads * d, spec.num_heads, attn_do, resid_do,
                         scores),
            _moe_bytes(spec, layout, q, b, resid_do) if moe else
            _mlp_bytes(layout, q, b, h, spec.ffn_size, spec.activation == "swiglu", resid_do),
        ]
    rep = sum(r for r, _ in parts)
    shard = sum(x for _, x in parts)
    return (rep / t if layout.sequence_parallel else rep) + shard / t


def op_policy_matmuls(spec: ModelConfig, layout: Layout) -> list[tuple[str, float, int, bool]]:
    """A decoder block's matmuls under torchtitan's op-level selective checkpointing ("op" SAC).

    torchtitan's policy (``parallelize_llama.py``, ``_save_list``) saves the output of every ``aten.mm`` in a block
    except every second one (counted per block and forward), the flash / memory-efficient attention outputs and the
    sequence-parallel reduce-scatters, and recomputes everything else. Its Llama block runs the projections in the
    order q, k, v, o, w1 (gate), w3 (up), w2 (down), so q, v, gate and down are saved and k, o, up recomputed. A linear
    with a bias is ``aten.addmm``, which the list does not hold: with ``model.bias`` no projection output is saved.

    Returns (name, output elements per token on one TP rank, weight elements on that rank, saved) in that order.
    """
    t, h, f, d = layout.tp, spec.hidden_size, spec.ffn_size, spec.head_dim
    q, kv = spec.num_heads * d / t, spec.kv_heads * d / t
    order = [("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q)]
    if spec.activation == "swiglu":
        order += [("gate", f / t, h), ("up", f / t, h)]
    else:
        order += [("up", f / t, h)]
    order += [("down", h, f / t)]
    return [(name, out, int(out * inner), i % 2 == 0 and not spec.bias) for i, (name, out, inner) in enumerate(order)]


def _op_policy_bytes(spec: ModelConfig, layout: Layout) -> tuple[float, float]:
    """(saved, of which a plain backward also keeps) bytes of one block for one microbatch under the op policy.

    Saved: the block's input (the checkpoint's argument; split over TP with sequence parallelism), the saved matmul
    outputs, the attention output with its float32 log-sum-exp (flash and memory-efficient kernels only: attention
    that materializes the scores is recomputed), and with sequence parallelism the two reduce-scatter outputs. Of
    these, the o and down outputs and the reduce-scatters are tensors a block without checkpointing does not keep;
    the rest it keeps too, so the layer recomputed in backward adds only its other activations.
    """
    p = DTYPE_BYTES[layout.dtype]
    tokens = layout.seq_len // layout.cp * layout.micro_batch
    t, h = layout.tp, spec.hidden_size
    x = tokens * h * p / (t if layout.sequence_parallel else 1)
    saved = shared = x
    for name, out, _, keep in op_policy_matmuls(spec, layout):
        if keep:
            saved += tokens * out * p
            shared += 0 if name in ("o", "down") else tokens * out * p
    if layout.flash_attention:
        attn = tokens * spec.num_heads * spec.head_dim / t * p + 4 * tokens * spec.num_heads / t
        saved, shared = saved + attn, shared + attn
    if layout.sequence_parallel and t > 1:
        saved += 2 * tokens * h / t * p
    return saved, shared


def _layer_input_bytes(spec: ModelSpec, layout: Layout, decoder_layer: bool) -> float:
    """Full recomputation keeps only each layer's input (s*b*h values, s / cp of them per context-parallel rank;
    split over TP with sequence parallel)."""
    s = layout.seq_len // layout.cp
    if isinstance(spec, EncDecSpec) and decoder_layer:
        s = layout.target_len or layout.seq_len
    x = s * layout.micro_batch * spec.hidden_size * DTYPE_BYTES[layout.dtype]
    return x / layout.tp if layout.sequence_parallel else x


def inflight_microbatches(layout: Layout, stage: int) -> float:
    """Microbatches whose activations a pipeline stage holds at its peak, in units of the stage's whole layer stack.

    GPipe: all m. 1F1B: min(pp - stage, m). Interleaved with v chunks per rank: Megatron's warm-up of
    2(pp - stage - 1) + (v - 1) pp chunk-microbatches, plus the one in flight, each 1/v of the rank's layers; for
    stage 0 this is pp (1 + (pp - 1)/(pp v)) (Korthikanti et al. 2022, Section 4.2.3).
    """
    m, pp, v = layout.num_microbatches, layout.pp, layout.virtual_stages
    if pp == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(m)
    if layout.schedule == "1f1b":
        return float(min(pp - stage, m))
    chunks = 2 * (pp - stage - 1) + (v - 1) * pp + 1
    return min(chunks, m * v) / v


def activation_bytes(spec: ModelSpec, layout: Layout, stage: int) -> int:
    """Peak activation bytes of one pipeline stage on one TP rank."""
    n_enc = spec.num_encoder_layers if isinstance(spec, EncDecSpec) else 0
    layer_ids = rank_layers(spec, layout.pp, layout)[stage]
    kinds = [(i >= n_enc, is_moe_layer(spec, i)) for i in layer_ids]  # (a decoder layer, a mixture layer)
    if layout.recompute == "full":
        kept = sum(_layer_input_bytes(spec, layout, k[0]) for k in kinds)
        # The layer being recomputed during backward reruns its forward unchanged and holds all of its activations
        # (the s*s scores too when attention is not flash), once: one layer at a time.
        rerun = dataclasses.replace(layout, recompute="none")
        working = max(layer_activation_bytes(spec, rerun, *k) for k in set(kinds))
    elif layout.recompute == "selective-op":
        saved, shared = _op_policy_bytes(spec, layout)
        kept = len(kinds) * saved
        # The block being recomputed in backward rematerializes what the policy did not save, one block at a time.
        working = layer_activation_bytes(spec, dataclasses.replace(layout, recompute="none")) - shared
    else:
        per_layer = {k: layer_activation_bytes(spec, layout, *k) for k in set(kinds)}
        kept = sum(per_layer[k] for k in kinds)
        working = 0.0
    total = kept * inflight_microbatches(layout, stage) + working
    p = DTYPE_BYTES[layout.dtype]
    b, h = layout.micro_batch, spec.hidden_size
    if stage == layout.pp - 1:  # final norm and head inputs, and the loss's logits at the start of backward
        s = (layout.target_len or layout.seq_len) if isinstance(spec, EncDecSpec) else layout.seq_len // layout.cp
        vocab = spec.padded_vocab_size
        total += 2 * s * b * h * p + s * b * math.ceil(vocab / layout.tp) * LOSS_LOGIT_BYTES
    return int(math.ceil(total))


# ----------------------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------------------


def _gathered_bytes(spec: ModelSpec, layout: Layout, shapes: list[tuple[str, Shape]]) -> int:
    """Parameters gathered whole during forward and backward, in the training dtype, with their gradient.

    FSDP2 gathers one block (``fully_shard`` unit) at a time and prefetches the next: the largest layer, twice. With
    expert parallelism each routed expert is a unit of its own inside its block (``engines/fsdp.py``,
    ``shard_experts``), gathered while the block's own unit is: the larger of two blocks and a block with two experts
    (the one running and the one prefetched).
    DeepSpeed ZeRO-3 gathers module by module: the largest module (often the embedding or the head) with its
    gradient before the reduce-scatter, plus up to ``stage3_prefetch_bucket_size`` elements prefetched, the gathered
    parameters capped at ``stage3_max_live_parameters``.
    """
    p = DTYPE_BYTES[layout.dtype]
    if layout.engine == "fsdp":
        layers: dict[str, int] = {}
        experts: dict[str, int] = {}
        for name, shape in shapes:
            if layout.ep > 1 and is_expert(name):
                unit = name[:name.index(".", name.index(EXPERT_MARK) + len(EXPERT_MARK))]  # ...mlp.experts.<e>
                experts[unit] = experts.get(unit, 0) + math.prod(shape)
                continue
            key = name.split(".")[1] if name.startswith("layers.") else ".".join(name.split(".")[:3])
            layers[key] = layers.get(key, 0) + math.prod(shape)
        block = max(layers.values())
        return max(2 * block, block + 2 * max(experts.values(), default=0)) * p
    modules: dict[str, int] = {}
    for name, shape in shapes:
        module = name.rpartition(".")[0]
        if math.prod(shape) >= layout.persistence_threshold:  # persistent tensors are counted with the weights
            modules[module] = modules.get(module, 0) + math.prod(shape)
    largest = max(modules.values(), default=0)
    live = min(largest + layout.prefetch_bucket, max(layout.max_live_parameters, largest))
    return p * (live + largest)


def estimate(spec: ModelSpec, layout: Layout, gpu_memory: int | None = None) -> dict:
    """Per-GPU bytes for the most-loaded rank, with a breakdown and whether it fits ``gpu_memory``."""
    spec = as_spec(spec)
    layout.validate(spec)
    stages = []
    for stage in range(layout.pp):
        shapes = stage_shapes(spec, layout.tp, layout.pp, stage, layout)
        states = rank_state_bytes(shapes, layout)
        act = activation_bytes(spec, layout, stage)
        gathered = _gathered_bytes(spec, layout, shapes) if layout.sharded else 0
        resident = states["weights"] + states["gradients"] + states["optimizer"] + layout.overhead_bytes
        # Two peaks: the last backward (activations and gathered weights live) and the optimizer step (activations
        # and gathered weights freed, the fp32 gradient copy made); the larger one is the stage's.
        backward = resident + act + gathered
        step = resident + states["step_gradients"]
        # The breakdown is the backward peak's, plus what the optimizer step adds above it (``fp32_gradients``, 0
        # when the backward is the higher one), so that it sums to the peak and always shows the activations.
        breakdown = {"weights": states["weights"], "gradients": states["gradients"],
                     "fp32_gradients": max(0, step - backward), "optimizer": states["optimizer"],
                     "activations": act, "overhead": layout.overhead_bytes + gathered}
        stages.append({"stage": stage, "per_gpu_bytes": sum(breakdown.values()), "breakdown": breakdown,
                       "peak_phase": "optimizer step" if step > backward else "backward",
                       "phases": {"backward": backward, "optimizer_step": step, "activations": act,
                                  "gathered": gathered, "fp32_gradients": states["step_gradients"],
                                  "model_states": max(backward - act, step) - layout.overhead_bytes},
                       "cpu_bytes": states["cpu"], "params": sum(math.prod(s) for _, s in shapes)})
    worst = max(stages, key=lambda st: st["per_gpu_bytes"])
    out = {
        "layout": {"gpus": layout.gpus, "tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp,
                   "ep": layout.ep, "expert_data": layout.expert_data, "engine": layout.engine,
                   "zero": layout.zero, "offload": layout.offload, "micro_batch": layout.micro_batch,
                   "seq_len": layout.seq_len, "target_len": layout.target_len, "global_batch": layout.global_batch,
                   "num_microbatches": layout.num_microbatches,
                   "recompute": layout.recompute, "schedule": layout.schedule, "dtype": layout.dtype,
                   "sequence_parallel": layout.sequence_parallel, "flash_attention": layout.flash_attention},
        "per_gpu_bytes": worst["per_gpu_bytes"],
        "breakdown": worst["breakdown"],
        "peak_phase": worst["peak_phase"],
        "phases": worst["phases"],
        "cpu_bytes": worst["cpu_bytes"],
        "cpu_bytes_per_node": worst["cpu_bytes"] * min(layout.gpus, layout.gpus_per_node),
        "most_loaded_stage": worst["stage"],
        "stages": stages,
        "gpu_memory": gpu_memory,
        "fits": None if gpu_memory is None else worst["per_gpu_bytes"] <= gpu_memory,
    }
    return out
