"""One training step of one simulated rank, traced with fake tensors: the memory peak by category.

Under ``FakeTensorMode`` tensors have shapes, dtypes and devices but no storage, so the rank's real part of the model
(built by ``simulate.py``) runs one microbatch at the real sequence length, its backward and the optimizer step, and
torch's memory tracker (``torch.distributed._tools``: ``MemTracker``, or ``FSDPMemTracker`` under FSDP2) records what
would be allocated, by category. The collectives run on the fake process group and move nothing.

What it cannot see: CPU kernels are traced, so the attention's memory is that of the CPU's kernel (a fused GPU kernel
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
    if cfg.model.family == "encoder_decoder" and topology.pp > 1:
        raise NotImplementedError("a traced step of an encoder-decoder pipeline stage")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = built.model.to_empty(device="cpu")
        optimizer = None if engine == "deepspeed" else build_adamw(model, cfg.optimizer, torch.device("cpu"),
                                                                   built.no_decay)
        stage = built.roots[0]
        inputs, target = _microbatch(cfg, task, topology, built)
        if engine == "fsdp":
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            tracker = FSDPMemTracker(stage, optimizer)
        else:
            tracker = MemTracker()
            tracker.track_external(model, *([optimizer] if optimizer is not None else []))
        autocast = contextlib.nullcontext()
        if engine != "fsdp" and cfg.training.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float16
            autocast = torch.autocast("cpu", dtype=dtype)
        with tracker:
            with autocast:
                out = stage(*inputs["args"], **inputs["kwargs"])
            if target is None:  # a stage before the last: its output's gradient arrives from the next stage
                loss = out.float().sum()
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
    """What this rank's first stage takes for one microbatch (token ids, or hidden states after the first stage),
    and the target when that stage is the last."""
    b, s = cfg.training.micro_batch_size, cfg.data.seq_len
    vocab = cfg.model.vocab_size
    first = built.parts is None or built.parts.indices[0] == 0
    last = built.parts is None or built.parts.indices[0] == built.parts.num_stages - 1
    labels = torch.randint(0, vocab, (b, s))
    if cfg.model.family == "encoder_decoder":
        t = cfg.data.target_seq_len or s
        labels = torch.randint(0, vocab, (b, t))
        mb = {"input_ids": torch.randint(0, vocab, (b, s)), "labels": labels}
        kwargs = task.inputs(mb)
        return {"args": (kwargs.pop("input_ids"),), "kwargs": kwargs}, labels
    from megatron_lite.parallel.context import split_sequence

    mb = split_sequence({"input_ids": torch.randint(0, vocab, (b, s)), "labels": labels}, topology.cp,
                        topology.cp_rank)
    kwargs = task.inputs(mb)  # token ids and the positions of this rank's part of the sequence
    ids = kwargs.pop("input_ids")
    if first:
        args = (ids,)
    else:
        dtype = torch.bfloat16 if cfg.parallel.engine == "fsdp" and cfg.training.precision == "bf16" else torch.float32
        local = ids.shape[1] // (topology.tp if cfg.parallel.sequence_parallel else 1)  # split along the sequence
        args = (torch.randn(b, local, cfg.model.hidden_size, dtype=dtype, requires_grad=True),)
    return {"args": args, "kwargs": kwargs}, mb["labels"] if last else None
