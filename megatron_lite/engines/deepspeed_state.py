"""DeepSpeed ZeRO's state as logical checkpoint tensors: the part of ``DeepSpeedEngine`` that saves and loads.

Checkpoints use the logical format. Saving walks the parameters one by one on every rank, in the same order:
``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` assemble the parameter's fp32 master weight and AdamW
moments from whatever ZeRO partitioning is in place (a collective), and only the rank that owns the parameter (bytes
balanced over ranks) keeps a CPU copy; the others drop it at once. Each rank then writes its own keys through DCP, so
a rank holds ~12 bytes x parameters / world size on the CPU, never the whole model. Loading reads the logical tensors
in groups of at most ``load_budget_bytes`` and scatters each group with the ``safe_set_*`` counterparts. A checkpoint
saved under ZeRO-3 on two ranks therefore loads under FSDP on one, and the other way round. DeepSpeed's native
checkpoint files are not written: they cannot change world size. The fp16 loss scaler's counters go to meta.json
(``extra_state``).

With expert parallelism the routed experts live outside ZeRO (``deepspeed.py``): each rank holds its experts whole,
stepped by a torch AdamW of their own (on fp32 masters in bf16). They are saved under the same logical names as every
other engine's, each by one of the ranks that hold it (balanced over the expert-data group, as the dense tensors are
over the data axis), and loaded into the masters, the module and that optimizer's state.

DeepSpeed internals used (checked with 0.19.8; ``pyproject.toml`` allows 0.19.x only): ZeRO-3's parameter attributes
``ds_id``, ``ds_tensor`` and ``ds_shape``; ``_hp_mapping`` on ZeRO-1/2 and bf16-optimizer parameters;
``fp32_partitioned_groups_flat`` (ZeRO-3's flat partitions); ``_hp_optimizer_states_linked`` and
``_lazy_init_hp_params_optimizer_state`` (ZeRO-1/2 link each parameter's fragment to the optimizer state once, after
their first step); ``loss_scaler`` / ``loss_scale_config`` and their counters (fp16).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.engines.logical import balance_owners, budget_groups, ensure_adamw_state_for, tensor_parallel_view
from megatron_lite.step.checkpoint_format import OPTIM_STATE_KEYS, param_name_of, read_logical, write_logical

MOMENT_KEYS = tuple(k for k in OPTIM_STATE_KEYS if k != "step")


class ZeROCheckpointState:
    """Logical checkpoints of ``DeepSpeedEngine`` (a mixin: it reads the engine's ``engine``, ``optimizer``,
    ``model``, ``stage``, ``topology``, ``shards``, ``aliases``, ``_masters``, and with expert parallelism
    ``expert_optimizer`` and ``_expert_masters``)."""

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

    def _stepped(self, p: nn.Parameter) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        """For a parameter outside ZeRO's partitions (ZeRO-0's, or a routed expert's under expert parallelism): the
        tensor AdamW steps for it (its fp32 copy in bf16/fp16, else ``p`` itself) and that AdamW."""
        if p in self._expert_masters:
            return self._expert_masters[p], self.expert_optimizer
        return self._masters.get(p, p), self.optimizer

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
        else:  # ZeRO-0, or an expert: this rank holds the whole master and its moments; nothing to communicate
            master, optimizer = self._stepped(p)
            value = master if key is None else optimizer.state[master][key]
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

    def _optimizer_tensors(self) -> list[tuple[torch.optim.Optimizer, list[torch.Tensor]]]:
        """Each torch AdamW with the tensors it steps: the client optimizer's, and the experts' (expert parallelism)."""
        out = [(self.optimizer, self._flat_params())]
        if self.expert_optimizer is not None:
            out.append((self.expert_optimizer, [t for g in self.expert_optimizer.param_groups for t in g["params"]]))
        return out

    def _base_state(self) -> list[dict]:
        return [opt.state[t] for opt, tensors in self._optimizer_tensors() for t in tensors]

    def _ensure_optimizer_state(self) -> None:
        """Create AdamW's state before the first step, so it can be written or overwritten in place.

        torch AdamW creates it lazily in its first step: a 0-d float32 step count and zero moments shaped like the
        tensor (here, like DeepSpeed's flat partition). Creating the same entries ahead of time changes nothing.
        """
        for optimizer, tensors in self._optimizer_tensors():
            ensure_adamw_state_for(optimizer, tensors)
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
        axis. Routed experts under expert parallelism differ between the ranks of an ep group and need no assembly:
        each is owned by one of the ranks holding it (balanced over the expert-data group). With tensor parallelism
        each tensor-parallel rank's owner writes its shard, as a part of the full tensor, through a view of the CPU
        copy itself (``tensor_parallel_view``): nothing goes back to the device to be written.
        """
        self._ensure_optimizer_state()
        step = self._step_count()
        named, buffers = self._names(), self._buffers()
        mine = self._owned([p for p, _ in named], buffers)
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

    def _owned(self, params: list[nn.Parameter], buffers: list[tuple[str, torch.Tensor]]) -> list[bool]:
        """Whether this rank writes each of ``params`` and then each of ``buffers``: the replicated ones (all but the
        experts) balanced over the data axis, the experts over the ranks holding the same ones (expert-data group).
        A pure function of sizes, the same on every rank that holds the same tensors."""
        topo = self.topology
        experts = [p in self._expert_masters for p in params]
        sizes = [self._entry_bytes(p) for p, e in zip(params, experts) if not e]
        sizes += [b.numel() * b.element_size() for _, b in buffers]
        shared = iter(owner == topo.data_rank for owner in balance_owners(sizes, topo.data_size))
        expert_rank = dist.get_rank(topo.expert_data_group()) if any(experts) else 0
        own = iter(owner == expert_rank for owner in balance_owners(
            [self._entry_bytes(p) for p, e in zip(params, experts) if e], topo.expert_data_size))
        return [next(own) if e else next(shared) for e in experts] + list(shared)

    def save(self, path: Path) -> None:
        """Every rank writes only the keys it owns; DCP's planner merges the ranks' different key sets."""
        write_logical(self.owned_state(), path)

    def load(self, path: Path) -> None:
        """Read the logical tensors in groups of at most ``load_budget_bytes`` and scatter each group into ZeRO.

        ``safe_set_full_*`` takes the full tensor on every rank and keeps that rank's partition, so every rank reads
        each group whole; a group is dropped before the next is read, so no rank holds the whole model at once. The
        group's buffers are allocated on the device (the mesh's), and each tensor-parallel view wraps its buffer's
        memory (``tensor_parallel_view`` checks it), so what DCP reads is what ZeRO receives.
        """
        self._ensure_optimizer_state()
        named = self._names()
        steps: set[float] = set()
        dev = self.topology.device  # the mesh's device: where ZeRO takes the full tensors, and DCP's views live
        for group in budget_groups([self._entry_bytes(p) for p, _ in named], self.load_budget_bytes):
            entries = [named[i] for i in group]
            state: dict[str, torch.Tensor] = {}
            for p, names in entries:
                shape = self._shape(p)
                state[f"model.{names[0]}"] = torch.empty(shape, dtype=torch.float32, device=dev)
                for key in MOMENT_KEYS:
                    state[f"optim.{self._first(names)}.{key}"] = torch.empty(shape, dtype=torch.float32, device=dev)
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
        master, optimizer = self._stepped(p)
        if master is not p:  # an fp32 master; where AdamW steps ``p`` itself, _copy_into_module sets it
            master.copy_(weight.reshape(master.shape))
        for key in MOMENT_KEYS:
            optimizer.state[master][key].copy_(state[f"optim.{optim_name}.{key}"].reshape(master.shape))

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
