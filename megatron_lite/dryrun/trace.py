"""One training step of one simulated rank, traced with fake tensors: the memory peaks by category.

Under ``FakeTensorMode`` tensors have shapes, dtypes and devices but no storage, so the rank's real part of the model
(built by ``simulate.py``) runs one microbatch at the real sequence length and its backward, then the optimizer step
(with the states a step after the first finds), and torch's memory tracker (``torch.distributed._tools``:
``MemTracker``, or ``FSDPMemTracker`` under FSDP2) records what would be allocated, by category, in each of the two
phases. The collectives run on the fake process group and move nothing. A pipeline stage takes what the stage before
declares it sends (``parallel/pipeline.py`` ``stage_io``), and its own output must match what it declares: the static
shapes a launch would use, checked at the real world size.

What it cannot see: a mixture layer's routing (the tokens are taken as spread evenly over the experts); CPU kernels
are traced, so the attention's memory is that of the CPU's kernel (a fused GPU kernel such as flash attention keeps
less), and a pipeline rank runs one microbatch through its first stage, not the schedule's microbatches in flight.
DeepSpeed's partitions are not built (see ``simulate.py``): for it the trace runs the forward and backward only, and
its states come from ZeRO's rules.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_lite.config import Config
from megatron_lite.engines.build import Built
from megatron_lite.families import get_family
from megatron_lite.parallel.pipeline import HALF_DTYPES
from megatron_lite.step.optim import build_adamw
from megatron_lite.topology import Topology

# torch's reference types by member name (MemTracker's and FSDPMemTracker's spell their values differently).
CATEGORIES = {"PARAM": "params", "SHARDED_PARAM": "params", "UNSHARDED_PARAM": "gathered", "ALL_GATHER": "gathered",
              "GRAD": "grads", "SHARDED_GRAD": "grads", "UNSHARDED_GRAD": "gathered", "OPT": "optimizer",
              "ACT": "activations", "INP": "activations", "TEMP": "temporaries", "REDUCE_SCATTER": "temporaries",
              "BUFFER": "buffers", "OTH": "other"}


def trace_step(cfg: Config, topology: Topology, built: Built) -> dict[str, int]:
    """Bytes at the peak of one step's forward and backward on this rank, by category, and ``total``; with
    ``step_temporaries``, the temporaries at the optimizer step's own peak.

    The two phases are traced apart because they peak apart, as the planner models them: the backward with the
    activations and gathered weights live, the optimizer step after they are freed. Read at the one peak of the whole
    step, a step whose optimizer states outweigh its activations (a large mixture model sharded thin) peaks in the
    optimizer, and the activations read there are what is left of them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    engine = cfg.parallel.engine
    task = get_family(cfg.model.family).task(cfg, topology)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = built.model.to_empty(device="cpu")
        optimizer = None if engine == "deepspeed" else build_adamw(model, cfg.optimizer, torch.device("cpu"),
                                                                   built.no_decay)
        if optimizer is not None:
            _create_optimizer_states(optimizer)
        stage = built.roots[0]
        for layer in model.modules():  # mixture layers: fake tensors hold no routing to count
            if hasattr(layer, "assume_even_load"):
                layer.assume_even_load = True
        inputs, target = _microbatch(cfg, task, topology, built)
        autocast = contextlib.nullcontext()
        half = HALF_DTYPES.get(cfg.training.precision)
        if half is not None and engine == "deepspeed":
            _cast_weights(model, half)  # DeepSpeed holds the module's weights in half precision
        elif half is not None and engine != "fsdp":  # FSDP2's policy casts its units' weights
            autocast = torch.autocast("cpu", dtype=half)
        with _tracker(engine, stage, model, optimizer) as tracker:
            with autocast:
                out = stage(*inputs["args"], **inputs["kwargs"])
            if inputs["declared"] is not None:  # what a pipeline stage returns is what it declares to the next
                _check_declared(out, inputs["declared"])
            if target is None:  # a stage before the last: its output's gradient arrives from the next stage
                loss = sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)))
            else:
                loss = task.loss(out, target, True)[0]
            loss.backward()
        traced = _by_category(tracker)
        if optimizer is not None:
            del out, loss
            with _tracker(engine, stage, model, optimizer) as tracker:
                before = _by_category(tracker, "current")["total"]
                optimizer.step()
            # what the step allocates above what it starts with (the trackers count it as optimizer state)
            traced["step_temporaries"] = _by_category(tracker)["total"] - before
    return traced


def _tracker(engine: str, stage: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """torch's tracker for this engine: FSDP2's knows its sharded, gathered and reduced tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker

    if engine == "fsdp":
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        return FSDPMemTracker(stage, optimizer)
    tracker = MemTracker()
    tracker.track_external(model, *([optimizer] if optimizer is not None else []))
    return tracker


def _by_category(tracker, which: str = "peak") -> dict[str, int]:
    """The tracker's ``which`` snapshot ("peak" or "current") summed over devices, in our category names."""
    out: dict[str, int] = {"total": 0}
    for device_stats in tracker.get_tracker_snapshot(which).values():
        for key, value in device_stats.items():
            name = "total" if key == "Total" else CATEGORIES.get(getattr(key, "name", str(key)), "other")
            out[name] = out.get(name, 0) + int(value)
    return out


def _create_optimizer_states(optimizer: torch.optim.Optimizer) -> None:
    """Give the optimizer the states every step after the first finds (AdamW creates its moments in its first step),
    so that the traced optimizer step is a later one."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _microbatch(cfg: Config, task, topology: Topology, built: Built) -> tuple[dict, torch.Tensor | None]:
    """What this rank's first stage takes for one microbatch (token ids, or what the stage before sends, as the
    pipeline declares it), what it declares it returns, and the target when that stage is the last."""
    b, s = cfg.training.micro_batch_size, cfg.data.seq_len
    vocab = cfg.model.vocab_size
    mb = {"input_ids": torch.randint(0, vocab, (b, s)), "labels": torch.randint(0, vocab, (b, s))}
    if cfg.model.family == "encoder_decoder":
        mb["labels"] = torch.randint(0, vocab, (b, cfg.data.target_seq_len or s))
    else:
        from megatron_lite.parallel.context import split_sequence

        mb = split_sequence(mb, topology.cp, topology.cp_rank)  # positions of this rank's part of the sequence
    kwargs = task.inputs(mb)
    parts = built.parts
    if parts is None:
        return {"args": (kwargs.pop("input_ids"),), "kwargs": kwargs, "declared": None}, mb["labels"]
    from megatron_lite.parallel.pipeline import stage_io

    index = parts.indices[0]
    takes, gives = stage_io(parts.holder, cfg, topology.tp, parts.ranges, index, kwargs)
    ids = kwargs.pop("input_ids")
    args = (ids,) if index == 0 else tuple(torch.randn(t.shape, dtype=t.dtype, requires_grad=True) for t in takes)
    last = index == parts.num_stages - 1
    return {"args": args, "kwargs": kwargs, "declared": gives}, mb["labels"] if last else None


def _cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)`` for fake weights (which ``Module.to`` cannot swap in place), keeping tied ones tied."""
    cast: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point():
                if id(p) not in cast:
                    cast[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                module._parameters[name] = cast[id(p)]


def _check_declared(out, declared: tuple[torch.Tensor, ...]) -> None:
    produced = out if isinstance(out, tuple) else (out,)
    got = [(tuple(t.shape), t.dtype) for t in produced]
    want = [(tuple(t.shape), t.dtype) for t in declared]
    if got != want:
        raise RuntimeError(f"the pipeline stage returned {got} but declares {want}")
