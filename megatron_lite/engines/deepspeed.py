"""DeepSpeed ZeRO 0-3 (with optional CPU offload) behind the engine interface.

DeepSpeed owns loss scaling, gradient averaging, accumulation boundaries and clipping (from the generated JSON, see
``deepspeed_config.py``); this engine only feeds it the shared step's microbatch losses (already normalized by the
global token count, so ``backward`` is told not to divide by the accumulation steps again) and sets the learning rate
of the client optimizer, a plain ``torch.optim.AdamW``, so the update is the same arithmetic as in every other engine.

The model is built shard by shard from the meta device: under ZeRO-3, its parameters are partitioned module by module
(``materialize.partition_for_zero3``, through ``deepspeed.zero.Init(module=...)``) and each rank then fills only its
own partitions with their by-name initial values; under ZeRO 0-2, which keep full weights on every rank by design,
the model is materialized whole.

Checkpoints use the logical format. Saving walks the parameters one by one on every rank, in the same order:
``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` assemble the parameter's fp32 master weight and AdamW
moments from whatever ZeRO partitioning is in place (a collective), and only the rank that owns the parameter (bytes
balanced over ranks) keeps a CPU copy; the others drop it at once. Each rank then writes its own keys through DCP, so
a rank holds ~12 bytes x parameters / world size on the CPU, never the whole model. Loading reads the logical tensors
in groups of at most ``load_budget_bytes`` and scatters each group with the ``safe_set_*`` counterparts. A checkpoint
saved under ZeRO-3 on two ranks therefore loads under FSDP on one, and the other way round. DeepSpeed's native
checkpoint files are not written: they cannot change world size. The fp16 loss scaler's counters go to meta.json
(``extra_state``).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.engines.base import Engine, GradientPiece, ModelFactory
from megatron_lite.engines.deepspeed_config import deepspeed_config
from megatron_lite.engines.gradients import clip_gradients, global_grad_norm
from megatron_lite.engines.logical import (
    OPTIM_STATE_KEYS,
    balance_owners,
    budget_groups,
    ensure_adamw_state_for,
    param_name_of,
    read_logical,
    tensor_parallel_view,
    write_logical,
)
from megatron_lite.engines.materialize import fill_zero3_partitions, materialize, partition_for_zero3
from megatron_lite.parallel.pipeline import PipelineRunner, split_model
from megatron_lite.parallel.tensor import tensor_aliases, tensor_parallel_shards
from megatron_lite.topology import Topology, ensure_process_group
from megatron_lite.training.optim import build_adamw, no_decay_names
from megatron_lite.training.tasks import Task

MOMENT_KEYS = tuple(k for k in OPTIM_STATE_KEYS if k != "step")


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with its CPU accelerator selected when training on the CPU (silences the detection warning)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's ZeRO calls collectives that newer torch marks deprecated, once per step and rank: not actionable here.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed

    return deepspeed


def check_precision(cfg: Config, device: torch.device) -> None:
    """DeepSpeed's CPU accelerator has no fp16 kernels; say so before DeepSpeed fails deep inside initialize."""
    if cfg.training.precision != "fp16":
        return
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        raise ConfigError(
            f"training.precision=fp16 with parallel.engine=deepspeed needs a GPU (DeepSpeed's "
            f"{get_accelerator().device_name()} accelerator has no fp16); use bf16, or fp16 with the ddp engine"
        )


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` over the model built shard by shard, with a client torch AdamW; logical checkpoints."""

    def __init__(self, cfg: Config, factory: ModelFactory, topology: Topology, task: Task) -> None:
        self.cfg = cfg
        self.topology = topology
        self.task = task
        deepspeed = import_deepspeed(topology.device)
        check_precision(cfg, topology.device)
        ensure_process_group(topology.device)
        # DeepSpeed asserts these exist, even for one plain-python process.
        os.environ.setdefault("RANK", str(topology.rank))
        os.environ.setdefault("WORLD_SIZE", str(topology.world_size))
        os.environ.setdefault("LOCAL_RANK", str(topology.local_rank))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.ds_config, overrides = deepspeed_config(cfg, topology.dp)
        if overrides and topology.is_main:
            print(f"deepspeed_overrides merged into the generated DeepSpeed config: {overrides}", flush=True)
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self._parts = None
        self.model = self._build(factory, deepspeed)
        self.optimizer = build_adamw(self.model, cfg.optimizer, topology.device, self._no_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False,
            mpu=TopologyMPU(topology) if topology.is_distributed else None,
        )
        self.module = self.engine
        self.accumulation = int(self.ds_config["gradient_accumulation_steps"])
        self._masters = self._unfused_masters()
        self._own_norm: float | None = None
        self.copies = self._parts.copies if self._parts else {}
        if self._parts:  # our schedule over the stages, DeepSpeed for the data axis and the optimizer step
            self.pipeline = PipelineRunner(self._parts.stages, self._parts, cfg, topology,
                                           lambda out, tgt, train: task.loss(out, tgt, train)[0])

    def _build(self, factory: ModelFactory, deepspeed) -> nn.Module:
        """ZeRO-3: partitioned parameter by parameter, each rank filling its partitions; else built on meta, then
        materialized whole (ZeRO 0-2 keep full weights on every rank)."""
        with torch.device("meta"):
            model = factory.construct()
        rules, self._no_decay = model.init_rules(), no_decay_names(model, self.cfg.optimizer)  # from the plain model
        if self.stage == 3:
            partition_for_zero3(model, self.ds_config, self.topology.group("dp"), deepspeed)
            fill_zero3_partitions(model, rules, factory.seed)
            self.shards, self.aliases = {}, {}  # ZeRO-3 with tensor or pipeline parallelism is refused at config time
            return factory.prepare(model)
        model = factory.prepare(model)
        self.shards, self.aliases = tensor_parallel_shards(model), tensor_aliases(model)
        if self.topology.pp > 1:
            self._parts = split_model(model, self.cfg, self.topology)
            model = self._parts.holder
        materialize(model, rules, factory.seed, self.topology.device, self.shards, self.aliases)
        if self._parts:  # a later stage's copy of a tied tensor: ZeRO's gradient norm counts the first one's only
            params = dict(model.named_parameters())
            for name in self._parts.replicas:
                params[name].ds_pipe_replicated = True
        return model

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

    def _finish_step(self, max_norm: float) -> tuple[float, bool]:
        """DeepSpeed's step at the accumulation boundary: it clips (to the JSON's ``gradient_clipping``) and steps.

        ZeRO-0 in fp32 clips but does not keep the norm, and under our pipeline schedule DeepSpeed's own clipping is
        off: there the averaged gradients are final, so the norm is ours, and with PP we clip here too.
        """
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
            grad = safe_get_full_grad(p) if self._managed(p) else p.grad
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
        return sum(t.numel() for t in self._flat_params())

    def _offload(self) -> list[str]:
        return [what for what, on in (("optimizer", self.engine.zero_offload_optimizer()),
                                      ("params", self.engine.zero_offload_param())) if on]

    # ------------------------------------------------------------------------------------------------------------------
    # Logical checkpoints
    # ------------------------------------------------------------------------------------------------------------------

    # Full fp32 bytes (weights and both AdamW moments) that one load step reads and scatters at a time.
    load_budget_bytes: int = 256 * 2**20

    def _names(self) -> list[tuple[nn.Parameter, list[str]]]:
        """Each trainable parameter with all its names (a tied matrix has several; the first is its logical name)."""
        names: dict[nn.Parameter, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(p, []).append(name)
        return list(names.items())

    def _buffers(self) -> list[tuple[str, torch.Tensor]]:
        """The persistent buffers, which every rank holds whole."""
        persistent = set(self.model.state_dict())
        return [(name, buf) for name, buf in self.model.named_buffers() if name in persistent]

    def _managed(self, p: nn.Parameter) -> bool:
        """Whether ``p``'s fp32 master is partitioned by ZeRO (or DeepSpeed's bf16 optimizer): reach it via safe_*."""
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # the mapping is None where this rank holds none of p

    def _master(self, p: nn.Parameter) -> torch.Tensor:
        """The tensor AdamW steps for ``p`` under ZeRO-0: its fp32 copy in bf16/fp16, else ``p`` itself."""
        return self._masters.get(p, p)

    @staticmethod
    def _shape(p: nn.Parameter) -> torch.Size:
        return torch.Size(p.ds_shape) if hasattr(p, "ds_id") else p.shape  # ZeRO-3 leaves an empty placeholder

    def _entry_bytes(self, p: nn.Parameter) -> int:
        """Bytes of ``p``'s logical tensors in full: the fp32 weight and the AdamW moments."""
        return 4 * self._shape(p).numel() * (1 + len(MOMENT_KEYS))

    def _full(self, p: nn.Parameter, key: str | None, keep: bool) -> torch.Tensor | None:
        """A CPU copy of the full fp32 master weight (``key`` None) or AdamW moment of ``p``; None unless ``keep``.

        Under ZeRO assembling it is a collective over the data-parallel group, so every rank calls this for every
        parameter and key; a rank that does not keep the result drops it before the next one is assembled.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self._managed(p):
            value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        else:  # ZeRO-0: every rank holds the whole master and its moments; nothing to communicate
            master = self._master(p)
            value = master if key is None else self.optimizer.state[master][key]
        if not keep:
            return None
        return value.detach().to("cpu", torch.float32, copy=True).reshape(self._shape(p))

    def _flat_params(self) -> list[torch.Tensor]:
        """The tensors the client optimizer steps on: flat fp32 partitions under ZeRO, the parameters under ZeRO-0.

        ZeRO-3 puts its partitions into the optimizer's parameter groups only for the duration of ``step``.
        """
        if self.stage == 3:
            return list(self.engine.optimizer.fp32_partitioned_groups_flat)
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _base_state(self) -> list[dict]:
        return [self.optimizer.state[p] for p in self._flat_params()]

    def _ensure_optimizer_state(self) -> None:
        """Create AdamW's state before the first step, so it can be written or overwritten in place.

        torch AdamW creates it lazily in its first step: a 0-d float32 step count and zero moments shaped like the
        tensor (here, like DeepSpeed's flat partition). Creating the same entries ahead of time changes nothing.
        """
        ensure_adamw_state_for(self.optimizer, self._flat_params())
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """Point every parameter's ZeRO-1/2 (or bf16) fragments at the optimizer state of its partition.

        DeepSpeed links them after stepping the first parameter group, when the state of later groups does not exist
        yet, and never again; with two groups (decay / no decay) the second stays unlinked. Linking again is cheap
        and idempotent.
        """
        opt = self.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _step_count(self) -> torch.Tensor:
        steps = [float(s["step"]) for s in self._base_state()]
        if len(set(steps)) > 1:
            raise RuntimeError(f"optimizer parameter groups disagree on the step count: {sorted(set(steps))}")
        return torch.tensor(steps[0] if steps else 0.0, dtype=torch.float32)

    def _set_step_count(self, value: float) -> None:
        for state in self._base_state():
            if torch.is_tensor(state["step"]):
                state["step"].fill_(value)
            else:
                state["step"] = value

    def owned_state(self) -> dict[str, torch.Tensor]:
        """The logical tensors this rank writes: full fp32 CPU copies of the parameters (and buffers) it owns.

        Ownership splits the bytes evenly over the data-parallel ranks (``balance_owners``, the same on every rank),
        and each key is held by exactly one of them, so a rank ends with about 12 bytes x parameters / world size on
        the CPU, plus one parameter's full tensor on the device at a time while ZeRO assembles it. Parameters are
        assembled one by one on every rank, in the same order, because the assembly is a collective over the data
        axis. With tensor parallelism each tensor-parallel rank's owner writes its shard, as a part of the full tensor.
        """
        self._ensure_optimizer_state()
        step = self._step_count()
        named, buffers = self._names(), self._buffers()
        sizes = [self._entry_bytes(p) for p, _ in named] + [b.numel() * b.element_size() for _, b in buffers]
        owners = balance_owners(sizes, self.topology.dp)
        mine = [owner == self.topology.dp_rank for owner in owners]
        out: dict[str, torch.Tensor] = {}
        for (p, names), keep in zip(named, mine):
            weight = self._full(p, None, keep)
            moments = {key: self._full(p, key, keep) for key in MOMENT_KEYS}
            if not keep:
                continue
            for name in names:  # tied weights under each name; write_logical copies the shared storage
                out[f"model.{name}"] = self._view(weight, names[0])
            for key, value in moments.items():
                out[f"optim.{self._first(names)}.{key}"] = self._view(value, names[0])
            out[f"optim.{self._first(names)}.step"] = step.clone()
        for (name, buf), keep in zip(buffers, mine[len(named):]):
            if keep:
                out[f"model.{name}"] = buf.detach().to("cpu", copy=True)
        return out

    def save(self, path: Path) -> None:
        """Every rank writes only the keys it owns; DCP's planner merges the ranks' different key sets."""
        write_logical(self.owned_state(), path)

    def load(self, path: Path) -> None:
        """Read the logical tensors in groups of at most ``load_budget_bytes`` and scatter each group into ZeRO.

        ``safe_set_full_*`` takes the full tensor on every rank and keeps that rank's partition, so every rank reads
        each group whole; a group is dropped before the next is read, so no rank holds the whole model at once.
        """
        self._ensure_optimizer_state()
        named = self._names()
        steps: set[float] = set()
        for group in budget_groups([self._entry_bytes(p) for p, _ in named], self.load_budget_bytes):
            entries = [named[i] for i in group]
            state: dict[str, torch.Tensor] = {}
            for p, names in entries:
                shape = self._shape(p)
                state[f"model.{names[0]}"] = torch.empty(shape, dtype=torch.float32)
                for key in MOMENT_KEYS:
                    state[f"optim.{self._first(names)}.{key}"] = torch.empty(shape, dtype=torch.float32)
                state[f"optim.{self._first(names)}.step"] = torch.zeros((), dtype=torch.float32)
            read_logical({key: self._view(t, param_name_of(key)) for key, t in state.items()}, path)
            for p, names in entries:
                self._set_full(p, names[0], self._first(names), state)
                steps.add(float(state[f"optim.{self._first(names)}.step"]))
            self._copy_into_module(entries, state)
        buffers = self._buffers()
        if buffers:
            state = {f"model.{name}": torch.empty_like(buf, device="cpu") for name, buf in buffers}
            read_logical(state, path)
            for name, buf in buffers:
                buf.data.copy_(state[f"model.{name}"])
        if len(steps) > 1:
            raise ValueError(f"checkpoint {path} holds different AdamW step counts per parameter: {sorted(steps)}")
        self._set_step_count(steps.pop() if steps else 0.0)

    def _first(self, names: list[str]) -> str:
        """The name the optimizer state is kept under: the tensor's first name in the whole model (a pipeline stage
        may hold a tied copy under its second name)."""
        return self.aliases.get(names[0], names[0])

    def _view(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """``t`` (this tensor-parallel rank's whole shard of parameter ``name``, or its state) as part of the full
        tensor, for DCP; a replicated tensor as it is."""
        return tensor_parallel_view(t, self.shards.get(name), self.topology)

    @torch.no_grad()
    def _set_full(self, p: nn.Parameter, name: str, optim_name: str, state: dict[str, torch.Tensor]) -> None:
        """Set ``p``'s fp32 master and AdamW moments (this rank's partition of them) from full tensors."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        weight = state[f"model.{name}"]
        if self._managed(p):
            dev = self.topology.device
            safe_set_full_fp32_param(p, weight.to(dev))
            for key in MOMENT_KEYS:
                safe_set_full_optimizer_state(p, state[f"optim.{optim_name}.{key}"].to(dev), key)
            return
        master = self._master(p)
        if p in self._masters:  # fp32 ZeRO-0 steps ``p`` itself, which _copy_into_module sets
            master.copy_(weight.reshape(master.shape))
        for key in MOMENT_KEYS:
            self.optimizer.state[master][key].copy_(state[f"optim.{optim_name}.{key}"].reshape(master.shape))

    @torch.no_grad()
    def _copy_into_module(self, entries: list[tuple[nn.Parameter, list[str]]], state: dict[str, torch.Tensor]) -> None:
        """Set the module's (possibly bf16, possibly ZeRO-3-partitioned) weights of ``entries`` from full tensors."""
        gathered = contextlib.nullcontext()
        if self.stage == 3:  # gather only this group; rank 0's values are scattered back on exit
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([p for p, _ in entries], modifier_rank=0)
        with gathered:
            for p, names in entries:
                p.data.copy_(state[f"model.{names[0]}"].to(p.device, p.dtype).reshape(p.shape))

    # ------------------------------------------------------------------------------------------------------------------
    # fp16 loss scale
    # ------------------------------------------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """DeepSpeed's dynamic fp16 loss-scaler counters (identical on every rank: overflow checks are all-reduced)."""
        state = loss_scaler_state(self.engine.optimizer)
        return {"loss_scale": state["cur_scale"], "deepspeed_loss_scaler": state} if state else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        own = state.get("deepspeed_loss_scaler")
        if own is None and "loss_scale" in state:  # saved by another engine: carry the scale over
            own = {"cur_scale": state["loss_scale"]}
        if own:
            load_loss_scaler_state(self.engine.optimizer, own)


class TopologyMPU:
    """The model-parallel unit DeepSpeed asks for (``deepspeed.initialize(mpu=...)``), answered from the Topology.

    With it ZeRO reduces and partitions over the data axis only, and its gradient norm adds up the tensor-parallel
    shards (parameters marked ``tensor_model_parallel``) over the tensor axis, counting replicated ones once.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._model_group = topology.group("tp")
        if topology.pp > 1:  # the norm is summed over the stages too: one group per data-parallel coordinate
            mesh = topology.mesh.mesh
            for d in range(topology.dp):
                ranks = sorted(int(r) for r in mesh[:, d, :].flatten())
                group = dist.new_group(ranks)  # every rank creates every group, in the same order
                if topology.rank in ranks:
                    self._model_group = group

    def get_model_parallel_rank(self) -> int:
        return self.topology.tp_rank  # replicated parameters are counted on tensor rank 0 of every stage

    def get_model_parallel_world_size(self) -> int:
        return self.topology.tp * self.topology.pp

    def get_model_parallel_group(self):
        return self._model_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.topology.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.topology.tp

    def get_tensor_model_parallel_group(self):
        return self.topology.group("tp")

    def get_data_parallel_rank(self) -> int:
        return self.topology.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topology.dp

    def get_data_parallel_group(self):
        return self.topology.group("dp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.topology.group("dp"))

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.topology.pp

    def get_pipeline_model_parallel_group(self):
        return self.topology.group("pp")


LOSS_SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _dynamic_scaler(optimizer: Any) -> Any:
    """The dynamic fp16 loss scaler of a DeepSpeed optimizer, or None (no fp16, or a static scale).

    ZeRO 1-3 keep a ``loss_scaler`` object; ZeRO-0's fp16 optimizers keep the same counters in ``loss_scale_config``.
    """
    for attr in ("loss_scaler", "loss_scale_config"):
        scaler = getattr(optimizer, attr, None)
        if scaler is not None and (getattr(scaler, "dynamic", False) or getattr(scaler, "dynamic_loss_scale", False)):
            return scaler
    return None


def loss_scaler_state(optimizer: Any) -> dict[str, Any]:
    """The scale and the counters that decide when it grows or backs off, as plain numbers; {} without a scaler."""
    scaler = _dynamic_scaler(optimizer)
    if scaler is None:
        return {}
    out: dict[str, Any] = {}
    for key in LOSS_SCALER_KEYS:
        if hasattr(scaler, key):
            value = getattr(scaler, key)
            value = value.item() if torch.is_tensor(value) else value
            out[key] = float(value) if key == "cur_scale" else value
    return out


def load_loss_scaler_state(optimizer: Any, state: dict[str, Any]) -> None:
    """Set the counters ``loss_scaler_state`` returned on this optimizer's scaler (those it has)."""
    scaler = _dynamic_scaler(optimizer)
    if scaler is None:
        return
    for key in LOSS_SCALER_KEYS:
        if key in state and hasattr(scaler, key):
            setattr(scaler, key, state[key])


@contextlib.contextmanager
def _optimizer_step_skipped(optimizer: Any, skip: bool):
    """Run DeepSpeed's step with the optimizer's own step left out when ``skip``.

    ZeRO-0 in fp32 has no overflow check: a NaN or inf gradient would go into the weights and the AdamW moments. Our
    norm is global, so every rank skips alike; DeepSpeed still does the rest of its step (its counters, zeroing the
    gradients), so its accumulation boundaries stay where they were.
    """
    if not skip:
        yield
        return
    optimizer.step = lambda *args, **kwargs: None  # shadows the class's step on this instance only
    try:
        yield
    finally:
        del optimizer.step
