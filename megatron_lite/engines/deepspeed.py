"""DeepSpeed ZeRO 0-3 (with optional CPU offload) behind the engine interface.

DeepSpeed owns loss scaling, gradient averaging, accumulation boundaries and clipping (from the generated JSON, see
``deepspeed_config.py``); this engine only feeds it the shared step's microbatch losses (already normalized by the
global token count, so ``backward`` is told not to divide by the accumulation steps again) and sets the learning rate
of the client optimizer, a plain ``torch.optim.AdamW``, so the update is the same arithmetic as in every other engine.

The model is built shard by shard from the meta device: under ZeRO-3, its parameters are partitioned module by module
(``materialize.partition_for_zero3``, through ``deepspeed.zero.Init(module=...)``) and each rank then fills only its
own partitions with their by-name initial values; under ZeRO 0-2, which keep full weights on every rank by design,
the model is materialized whole.

Checkpoints are the logical ones, written from and read into ZeRO's partitions (``deepspeed_state.py``); ZeRO reduces
and partitions over the data axis only, told so by a process-group adapter (``deepspeed_mpu.py``).

**Expert parallelism** (``parallel.ep > 1``, ZeRO 1-2; the rules refuse ZeRO 0 and 3): the routed experts are kept
out of DeepSpeed. Only the dense parameters go to ``deepspeed.initialize``'s optimizer, ZeRO-partitioned over the
data axis as ever; the experts (whole on every rank, different between the ranks of an ep group) get their own torch
AdamW, built by the same ``build_adamw`` (same hyper-parameters, same weight-decay groups), stepped beside
DeepSpeed's. Their gradients are reduced as DDP reduces them (``_reduce_expert_gradients``: summed over the
expert-data group, divided by the whole data axis) and they are clipped with the one global norm: DeepSpeed's norm
over its partitions widened, for the length of its step, by the experts' (``_norm_with_experts``), so DeepSpeed clips
the dense part and reports the norm, and the experts are clipped by the same number (mixture models refuse fp16, so
the experts' gradients carry no loss scale). In bf16 the experts keep fp32 masters, as ZeRO keeps for the dense
part. During ``deepspeed.initialize`` the experts are detached from the model (``_experts_hidden``): DeepSpeed would
otherwise broadcast every parameter from the first data-parallel rank, which overwrites one ep rank's experts with
another's. Checkpoints write the experts and their AdamW state under the same logical names as every engine, each by
one rank of the ranks holding it (``deepspeed_state.py``).

Why not DeepSpeed's own MoE support (expert parameters marked ``allreduce=False`` with a ``group_name``, a 'moe'
optimizer group, ``deepspeed.utils.groups`` expert groups): DeepSpeed turns it on only when the model holds its own
``deepspeed.moe.layer.MoE`` class (``has_moe_layers``, read before the optimizer is built), so it would take faking
that flag inside ``initialize``, filling DeepSpeed's private group tables with our expert-data groups, and trusting
that each ZeRO path (stage 1's boundary reduction, stage 2's buckets, its own MoE norm averaging, the ``safe_*``
checkpoint helpers) divides expert gradients by the data axis rather than by the expert-data group as DeepSpeed's
own MoE layer expects. Keeping the experts out costs one all-reduce per step over the expert-data group, the same as
DDP's, and leans on one more internal (``scaled_global_norm``) instead of a dozen.

DeepSpeed's internals used here and beside it, each where it is used: the ZeRO-0 unfused optimizer's ``fp16_groups``
/ ``fp32_groups``, ``skipped_steps``, ``set_gradient_accumulation_boundary``, ``allreduce_gradients`` and ZeRO-1's
``reduce_gradients(pipeline_parallel=True)`` (our pipeline schedule, as DeepSpeed's own pipeline engine calls them),
``ds_pipe_replicated``, ZeRO-1/2's ``scaled_global_norm`` and ``loss_scale`` (expert parallelism); in
``deepspeed_state.py`` the ZeRO-3 parameter attributes (``ds_id``, ``ds_tensor``, ``ds_shape``), ``_hp_mapping``,
``fp32_partitioned_groups_flat``, the ZeRO-1/2 optimizer-state links and the loss scalers' counters. They were checked
with DeepSpeed 0.19.8; ``pyproject.toml`` allows 0.19.x only.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config
from megatron_lite.engines.base import Engine, GradientPiece
from megatron_lite.engines.build import ModelFactory
from megatron_lite.engines.deepspeed_config import deepspeed_config
from megatron_lite.engines.gradients import clip_gradients, global_grad_norm
from megatron_lite.engines.build import build_model
from megatron_lite.engines.ddp import all_reduce_mean
from megatron_lite.engines.deepspeed_mpu import TopologyMPU
from megatron_lite.engines.deepspeed_state import ZeROCheckpointState, loss_scaler_state
from megatron_lite.engines.materialize import fill_zero3_partitions, partition_for_zero3
from megatron_lite.models.moe import is_expert_param
from megatron_lite.parallel.pipeline import PipelineRunner
from megatron_lite.step.optim import build_adamw
from megatron_lite.step.tasks import Task
from megatron_lite.topology import Topology, ensure_process_group


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with its CPU accelerator selected when training on the CPU (silences the detection warning).

    On the CPU its comm layer would also compile a shared-memory all-reduce op with the C++ compiler as it starts
    (about 45 s on 2 cores, and again whenever another process asks with other flags, as launches with other
    environments do); only its inference all-reduce uses that op, training's collectives go through the gloo group,
    so it is marked unavailable and nothing is compiled."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's ZeRO calls collectives that newer torch marks deprecated, once per step and rank: not actionable here.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedEngine(ZeROCheckpointState, Engine):
    """``deepspeed.initialize`` over the model built shard by shard, with a client torch AdamW; logical checkpoints."""

    def __init__(self, cfg: Config, factory: ModelFactory, topology: Topology, task: Task) -> None:
        self.cfg = cfg
        self.topology = topology
        self.task = task
        deepspeed = import_deepspeed(topology.device)
        ensure_process_group(topology.device)
        # DeepSpeed asserts these exist, even for one plain-python process.
        os.environ.setdefault("RANK", str(topology.rank))
        os.environ.setdefault("WORLD_SIZE", str(topology.world_size))
        os.environ.setdefault("LOCAL_RANK", str(topology.local_rank))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.ds_config, overrides = deepspeed_config(cfg, topology.dp, topology.cp)
        if overrides and topology.is_main:
            print(f"deepspeed_overrides merged into the generated DeepSpeed config: {overrides}", flush=True)
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self._deepspeed = deepspeed
        built = build_model(factory, cfg, topology, self)
        self.model, self.shards, self.aliases, self._parts = built.model, built.shards, built.aliases, built.parts
        if self._parts:  # a later stage's copy of a tied tensor: ZeRO's gradient norm counts the first one's only
            params = dict(self.model.named_parameters())
            for name in self._parts.replicas:
                params[name].ds_pipe_replicated = True
        # With expert parallelism the routed experts stay outside DeepSpeed (the module docstring says why)
        self.experts = {n: p for n, p in self.model.named_parameters() if is_expert_param(n)} if topology.ep > 1 else {}
        with _experts_hidden(self.model) if self.experts else contextlib.nullcontext():
            self.optimizer = build_adamw(self.model, cfg.optimizer, topology.device, built.no_decay)
            self.engine, _, _, _ = deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False,
                mpu=TopologyMPU(topology) if topology.is_distributed else None,
            )
        self._expert_masters: dict[nn.Parameter, torch.Tensor] = {}
        self.expert_optimizer: torch.optim.Optimizer | None = None
        if topology.ep > 1:
            self._build_expert_optimizer(built.no_decay)
        self.module = self.engine
        self.accumulation = int(self.ds_config["gradient_accumulation_steps"])
        self._masters = self._unfused_masters()
        self._own_norm: float | None = None
        self.copies = self._parts.copies if self._parts else {}
        if self._parts:  # our schedule over the stages, DeepSpeed for the data axis and the optimizer step
            self.pipeline = PipelineRunner(self._parts.stages, self._parts, cfg, topology,
                                           lambda out, tgt, train: task.loss(out, tgt, train)[0])

    def partition(self, model: nn.Module, roots: list[nn.Module]) -> None:
        """ZeRO-3: the meta parameters become partitioned ones, module by module, without a rank ever holding the
        whole model; ZeRO 0-2 keep full weights on every rank by design. (ZeRO-3 with tensor or pipeline
        parallelism is refused by the rules.)"""
        if self.stage == 3:
            partition_for_zero3(model, self.ds_config, self.topology.data_group(), self._deepspeed)

    def materialize(self, model: nn.Module, rules: dict, seed: int, built) -> None:
        """ZeRO-3: each rank fills its own partitions with their initial values; else the whole (TP-local) model."""
        if self.stage == 3:
            fill_zero3_partitions(model, rules, seed)
        else:
            super().materialize(model, rules, seed, built)

    def _build_expert_optimizer(self, no_decay: set[str]) -> None:
        """The experts' torch AdamW: ``build_adamw`` over the whole model (so the same hyper-parameters and weight-decay
        groups as the dense part's), kept to the experts. Each expert is cast to DeepSpeed's parameter dtype, as
        DeepSpeed cast the dense part; where that is not fp32 the optimizer steps an fp32 master of it instead."""
        opt = self.engine.optimizer
        if not (hasattr(opt, "scaled_global_norm") and hasattr(opt, "loss_scale")):
            raise RuntimeError(
                f"parallel.ep={self.topology.ep} under DeepSpeed needs its ZeRO-1/2 optimizer, which computes the "
                f"gradient norm the experts join; got {type(opt).__name__} (a deepspeed_overrides setting such as "
                "data_types.grad_accum_dtype selects another)")
        dtype = self.engine.get_data_types()[0]
        for p in self.experts.values():
            if p.dtype == dtype:
                self._expert_masters[p] = p
            else:
                self._expert_masters[p] = p.detach().to(torch.float32, copy=True)
                p.data = p.data.to(dtype)
        optimizer = build_adamw(self.model, self.cfg.optimizer, self.topology.device, no_decay)
        groups = []
        for group in optimizer.param_groups:
            params = [self._expert_masters[p] for p in group["params"] if p in self._expert_masters]
            if params:
                groups.append({**group, "params": params})
        optimizer.param_groups = groups
        self.expert_optimizer = optimizer

    def _unfused_masters(self) -> dict[nn.Parameter, torch.Tensor]:
        """ZeRO-0 in bf16/fp16 wraps torch AdamW in DeepSpeed's unfused optimizer: one fp32 copy per parameter."""
        opt = self.engine.optimizer
        if self.stage != 0 or not (hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups")):
            return {}
        return {lp: hp for lo, hi in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lo, hi)}

    # ------------------------------------------------------------------------------------------------------------------
    # The shared step's hooks
    # ------------------------------------------------------------------------------------------------------------------

    def _begin_step(self, lr: float, num_microbatches: int) -> None:
        if num_microbatches != self.accumulation:
            raise ValueError(
                f"got {num_microbatches} microbatches, but the DeepSpeed config accumulates {self.accumulation}"
            )
        for group in self.optimizer.param_groups:  # the client optimizer is DeepSpeed's base optimizer
            group["lr"] = lr
        if self.expert_optimizer is not None:
            for group in self.expert_optimizer.param_groups:
                group["lr"] = lr
            self._clear_expert_gradients()
        self._skipped_before = self.engine.skipped_steps
        self._own_norm = None
        self._nonfinite = False

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """DeepSpeed's backward (which reduces the gradients at the step's last microbatch); DeepSpeed's step for the
        microbatches before it only counts them, and the last one's is taken in ``_finish_step``."""
        self.engine.backward(loss, scale_wrt_gas=False)  # the shared step has normalized the loss already
        if not last:
            self.engine.step()

    def _reduce_pipeline_gradients(self) -> None:
        """After our schedule: DeepSpeed averages the gradients over the data axis (ZeRO-1: into its partitions)."""
        self.engine.set_gradient_accumulation_boundary(True)  # DeepSpeed reduces at a boundary only
        if self.stage == 1:  # the backwards ran outside DeepSpeed, as under its own pipeline engine
            self.engine.optimizer.reduce_gradients(pipeline_parallel=True)
        else:
            self.engine.allreduce_gradients()

    @torch.no_grad()
    def _reduce_expert_gradients(self) -> None:
        """The experts' gradients summed over the ranks holding the same experts and divided by the whole data axis,
        as DDP does (each already holds the contributions of its whole ep group's tokens); in fp32, on the masters. An
        expert no microbatch reached reduces zeros, so every rank of the group sends the same tensors."""
        if self.topology.ep == 1:
            return
        grads = []
        for p in self.experts.values():
            master = self._expert_masters[p]
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if master is not p:
                master.grad, p.grad = grad.to(master.dtype), None
            else:
                p.grad = grad
            grads.append(master.grad)
        all_reduce_mean(grads, self.topology.expert_data_group(), self.topology.data_size)

    def _clear_expert_gradients(self) -> None:
        for p, master in self._expert_masters.items():
            p.grad = master.grad = None

    def _finish_step(self, max_norm: float) -> tuple[float, bool]:
        """DeepSpeed's step at the accumulation boundary: it clips (to the JSON's ``gradient_clipping``) and steps.

        ZeRO-0 in fp32 clips but does not keep the norm, and under our pipeline schedule DeepSpeed's own clipping is
        off: there the averaged gradients are final, so the norm is ours, and with PP we clip here too.
        """
        if self.topology.ep > 1:
            return self._finish_step_with_experts(max_norm)
        if self.stage == 0 and (self.pipeline is not None or not self._masters):
            named = list(self.model.named_parameters())
            self._own_norm = float(global_grad_norm(named, self.topology, self.shards, self.copies))
            self._nonfinite = not math.isfinite(self._own_norm)
            if self.pipeline is not None:
                clip_gradients([p for _, p in named], max_norm, self._own_norm)
        with _optimizer_step_skipped(self.engine.optimizer, self._nonfinite):
            self.engine.step()
        norm = self.engine.get_global_grad_norm() if self._own_norm is None else self._own_norm
        grad_norm = float(norm) if norm is not None else math.nan
        return grad_norm, self._nonfinite or self.engine.skipped_steps > self._skipped_before

    def _finish_step_with_experts(self, max_norm: float) -> tuple[float, bool]:
        """DeepSpeed's step with its norm widened by the experts' (so it clips the dense part with the global norm and
        reports it), then, unless DeepSpeed skipped the step, the experts clipped by that norm and stepped."""
        named = [(name, self._expert_masters[p]) for name, p in self.experts.items()]
        expert_sq = float(global_grad_norm(named, self.topology, self.shards, self.copies)) ** 2  # over every rank
        with _norm_with_experts(self.engine.optimizer, expert_sq):
            self.engine.step()
        skipped = self.engine.skipped_steps > self._skipped_before
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        if not skipped:
            masters = [master for _, master in named]
            if norm is not None:  # DeepSpeed computes no norm only where it does not clip
                clip_gradients(masters, max_norm, grad_norm)
            self.expert_optimizer.step()
            with torch.no_grad():
                for p, master in self._expert_masters.items():
                    if master is not p:
                        p.copy_(master)
        self._clear_expert_gradients()
        return grad_norm, skipped

    # ------------------------------------------------------------------------------------------------------------------
    # What this rank holds
    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def gradient_pieces(self) -> list[GradientPiece]:
        """Each parameter's full (tensor-parallel-local) gradient, assembled by DeepSpeed from its ZeRO partitions
        (``safe_get_full_grad``, a collective: every rank walks the parameters in the same order); fp16 unscaled."""
        from deepspeed.utils import safe_get_full_grad

        scale = loss_scaler_state(self.engine.optimizer).get("cur_scale", 1.0)
        pieces = []
        for p, names in self._names():
            grad = safe_get_full_grad(p) if self._managed(p) else self._expert_masters.get(p, p).grad
            shape = self._shape(p)
            grad = torch.zeros(shape) if grad is None else grad.detach().to("cpu", torch.float32).reshape(shape) / scale
            full, offset = self._box(names[0], shape)
            pieces.append(GradientPiece(self._first(names), full, offset, grad))
        return pieces

    def _box(self, name: str, shape: torch.Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(full shape, offset) of this rank's tensor-parallel shard of ``name`` (of ``shape``), or of all of it."""
        shard = self.shards.get(name)
        if shard is None:
            return tuple(shape), (0,) * len(shape)
        return tuple(shard.global_shape), tuple(shard.offset if d == shard.dim else 0 for d in range(len(shape)))

    def reset_optimizer_state(self) -> None:
        """Clear the client AdamW's state (on ZeRO's flat partitions); ZeRO 1-2 link it to the parameters' fragments
        again after their next step."""
        self.optimizer.state.clear()
        if self.expert_optimizer is not None:
            self.expert_optimizer.state.clear()
        opt = self.engine.optimizer
        if hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False

    def _held_params(self) -> list[tuple[str, int, int]]:
        """ZeRO-3 holds a flat partition of each parameter (``ds_tensor``); ZeRO 0-2 the whole (TP-local) tensor."""
        out = []
        for p, names in self._names():
            full = self._box(names[0], self._shape(p))[0]
            held = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            out.append((self._first(names), math.prod(full), held))
        return out

    def _optimizer_numel(self) -> int:
        return sum(t.numel() for _, tensors in self._optimizer_tensors() for t in tensors)

    def _offload(self) -> list[str]:
        return [what for what, on in (("optimizer", self.engine.zero_offload_optimizer()),
                                      ("params", self.engine.zero_offload_param())) if on]


@contextlib.contextmanager
def _optimizer_step_skipped(optimizer: Any, skip: bool):
    """Run DeepSpeed's step with the optimizer's own step left out when ``skip``.

    ZeRO-0 in fp32 has no overflow check: a NaN or inf gradient would go into the weights and the AdamW moments. Our
    norm is global, so every rank skips alike; DeepSpeed still does the rest of its step (its counters, zeroing the
    gradients), so its accumulation boundaries stay where they were. DeepSpeed has no call that skips only the
    optimizer's update, so its ``step`` is shadowed on the instance for this one call and restored after it.
    """
    if not skip:
        yield
        return
    optimizer.step = lambda *args, **kwargs: None  # shadows the class's step on this instance only
    try:
        yield
    finally:
        del optimizer.step


@contextlib.contextmanager
def _experts_hidden(model: nn.Module):
    """``model`` without its routed experts (each mixture layer's ``experts`` emptied) for the duration: what
    ``deepspeed.initialize`` sees, so that it neither broadcasts, casts nor partitions them."""
    held = [(m, m.experts) for m in model.modules()
            if hasattr(m, "run_experts") and isinstance(getattr(m, "experts", None), nn.ModuleDict)]
    for module, _ in held:
        module.experts = nn.ModuleDict()
    try:
        if any(is_expert_param(name) for name, _ in model.named_parameters()):
            raise RuntimeError("a routed expert's parameter lies outside the mixture layers' experts")
        yield
    finally:
        for module, experts in held:
            module.experts = experts


@contextlib.contextmanager
def _norm_with_experts(optimizer: Any, expert_sq: float):
    """Run ZeRO-1/2's step with its gradient norm (over its partitions of the dense gradients, scaled by the loss
    scale) joined by the experts' (``expert_sq``: the sum of their squares over every rank, unscaled), so that
    DeepSpeed clips the dense part with the global norm and keeps it as its ``get_global_grad_norm``. A norm
    DeepSpeed found invalid (inf) stays so. ``scaled_global_norm`` is shadowed on the instance for this one call."""
    dense_norm = optimizer.scaled_global_norm

    def global_norm(*args, **kwargs):
        norm = torch.as_tensor(dense_norm(*args, **kwargs))
        scale = float(optimizer.loss_scale)
        return (norm.double().square() + expert_sq * scale * scale).sqrt().to(norm.dtype)

    optimizer.scaled_global_norm = global_norm
    try:
        yield
    finally:
        del optimizer.scaled_global_norm
