"""One training step of one simulated rank, traced with fake tensors: the memory peak by category.

Under ``FakeTensorMode`` tensors have shapes, dtypes and devices but no storage, so the rank's real part of the model
(built by ``simulate.py``) runs one microbatch at the real sequence length, its backward and the optimizer step, and
torch's memory tracker (``torch.distributed._tools``: ``MemTracker``, or ``FSDPMemTracker`` under FSDP2) records what
would be allocated, by category. The collectives run on the fake process group and move nothing. A pipeline stage
takes what the stage before declares it sends (``parallel/pipeline.py`` ``stage_io``), and its own output must match
what it declares: the static shapes a launch would use, checked at the real world size.

What it cannot see: a mixture layer's routing (the tokens are taken as spread evenly over the experts); CPU kernels
are traced, so the attention's memory is that of the CPU's kernel (a fused GPU kernel
such as flash attention keeps less), and a pipeline rank runs one microbatch through its first stage, not the
schedule's microbatches in flight. DeepSpeed's partitions are not built (see ``simulate.py``): for it the trace runs the
forward and backward only, and its states come from ZeRO's rules.
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

CATEGORIES = {"Parameter": "params", "Gradient": "grads", "Optstate": "optimizer", "Activation": "activations",
              "Temp": "temporaries", "Buffer": "buffers", "Other": "other",
              "Sharded Parameter": "params", "Unsharded Parameter": "gathered", "Sharded Gradient": "grads",
              "Unsharded Gradient": "gathered", "All Gather": "gathered", "Reduce Scatter": "temporaries",
              "Input": "activations"}


def trace_step(cfg: Config, topology: Topology, built: Built) -> dict[str, int]:
    """Bytes at the traced peak of one step of this rank, by category, and ``total``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    engine = cfg.parallel.engine
    task = get_family(cfg.model.family).task(cfg, topology)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = built.model.to_empty(device="cpu")
        optimizer = None if engine == "deepspeed" else build_adamw(model, cfg.optimizer, torch.device("cpu"),
                                                                   built.no_decay)
        stage = built.roots[0]
        for layer in model.modules():  # mixture layers: fake tensors hold no routing to count
            if hasattr(layer, "assume_even_load"):
                layer.assume_even_load = True
        inputs, target = _microbatch(cfg, task, topology, built)
        if engine == "fsdp":
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            tracker = FSDPMemTracker(stage, optimizer)
        else:
            tracker = MemTracker()
            tracker.track_external(model, *([optimizer] if optimizer is not None else []))
        autocast = contextlib.nullcontext()
        half = HALF_DTYPES.get(cfg.training.precision)
        if half is not None and engine == "deepspeed":
            _cast_weights(model, half)  # DeepSpeed holds the module's weights in half precision
        elif half is not None and engine != "fsdp":  # FSDP2's policy casts its units' weights
            autocast = torch.autocast("cpu", dtype=half)
        with tracker:
            with autocast:
                out = stage(*inputs["args"], **inputs["kwargs"])
            if inputs["declared"] is not None:  # what a pipeline stage returns is what it declares to the next
                _check_declared(out, inputs["declared"])
            if target is None:  # a stage before the last: its output's gradient arrives from the next stage
                loss = sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)))
            else:
                loss = task.loss(out, target, True)[0]
            loss.backward()
            if optimizer is not None:
                optimizer.step()
        snapshot = tracker.get_tracker_snapshot("peak")
    out: dict[str, int] = {}
    for device_stats in snapshot.values():
        for key, value in device_stats.items():
            name = "total" if key == "Total" else CATEGORIES.get(getattr(key, "value", str(key)), "other")
            out[name] = out.get(name, 0) + int(value)
    return out


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
