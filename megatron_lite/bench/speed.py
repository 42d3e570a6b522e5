"""``tools/bench.py speed``: our training step against Hugging Face's for the same model, interleaved in one process.

Both sides start from the same weights (ours converted with ``convert.hf``), so their first losses agree; then they
take turns step by step (which goes first alternates), and each side's median step time and the largest growth of
memory during one step are kept. MFU is against the peak the trainer uses (``training.metrics.device_peak_flops``):
``logging.peak_flops`` when an override sets it, else this GPU's dense peak for the precision in
``planning/hardware.py``; a CPU has none.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

from megatron_lite.config import Config, load_config

SPEED_STYLES = {  # ~15-40M parameters at the default width: the CPU sizes of the comparison with Hugging Face
    "llama": ["model.position=rotary", "model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false",
              "model.tie_embeddings=false", "model.num_kv_heads=2", "model.ffn_hidden_size=1024"],
    "gpt2": ["model.position=learned", "model.norm=layernorm", "model.activation=gelu_tanh", "model.bias=true",
             "model.tie_embeddings=true"],
}


@dataclass
class SpeedOptions:
    """The shape, batch and device both sides run; ``overrides`` are dotted config overrides for our side (the HF
    side follows the model)."""

    vocab: int = 8192
    hidden: int = 384
    layers: int = 8
    heads: int = 6
    seq_len: int = 256
    batch: int = 8
    precision: str = "fp32"  # or "bf16"
    device: str = "cpu"  # or "cuda"
    warmup: int = 3
    steps: int = 20
    overrides: list[str] = field(default_factory=list)


def speed_config(style: str, opts: SpeedOptions) -> Config:
    """Our side's training config for ``style`` (a key of ``SPEED_STYLES``)."""
    return load_config(None, [
        *SPEED_STYLES[style], f"model.vocab_size={opts.vocab}", f"model.hidden_size={opts.hidden}",
        f"model.num_layers={opts.layers}", f"model.num_heads={opts.heads}", f"model.max_seq_len={opts.seq_len}",
        f"data.seq_len={opts.seq_len}", f"training.global_batch_size={opts.batch}",
        f"training.micro_batch_size={opts.batch}", "training.grad_clip=1.0", f"training.precision={opts.precision}",
        f"training.device={opts.device}", "optimizer.lr=1e-4", "optimizer.weight_decay=0.1", *opts.overrides,
    ])


def mfu_peak(cfg: Config) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, and which number it is): what the trainer divides by for MFU. The dtype is
    the precision's (fp32 training: the non-tensor-core fp32 peak, 66.9 TFLOP/s on an H100 SXM; bf16: 989)."""
    import torch

    from megatron_lite.planning.hardware import find_device
    from megatron_lite.training.metrics import device_peak_flops

    device = torch.device(cfg.training.device)
    peak = device_peak_flops(cfg.logging, device, cfg.training.precision)
    if cfg.logging.peak_flops is not None:
        return peak, "logging.peak_flops"
    if device.type != "cuda":
        return None, "a CPU has no peak in planning/hardware.py"
    name = torch.cuda.get_device_name(device)
    found = find_device(name)
    if peak is None:
        return None, (f"no dense {cfg.training.precision} peak for '{name}' in planning/hardware.py: give "
                      "logging.peak_flops")
    return peak, f"{name}: the dense {cfg.training.precision} peak of {found[0]} in planning/hardware.py"


class _Clock:
    """Wall time of a step, synchronized with the device so that queued GPU work is counted."""

    def __init__(self, device) -> None:
        self.device = device

    def __call__(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def speed_compare(style: str, opts: SpeedOptions) -> dict:
    """Our training step and Hugging Face's for the same model, interleaved in this process; medians and peaks.

    Per side: ``step_s`` (median), ``tokens_per_s``, ``tflops`` (model FLOPs), ``mfu`` (None without a peak) and
    ``peak_bytes`` (the largest growth of allocated GPU or resident host memory during one step).
    """
    import torch
    import torch.nn.functional as F
    import transformers

    from megatron_lite.convert import hf
    from megatron_lite.engines import build_engine
    from megatron_lite.families import get_family
    from megatron_lite.planning.flops import training_flops_per_token
    from megatron_lite.planning.layout import Layout
    from megatron_lite.planning.memory import estimate
    from megatron_lite.topology import Topology
    from megatron_lite.training.metrics import host_peak_bytes, reset_host_peak

    cfg = speed_config(style, opts)
    topology = Topology(device=torch.device("cuda" if opts.device == "cuda" else "cpu"))
    device = topology.device
    family = get_family(cfg.model.family)
    ours = build_engine(cfg, family.factory(cfg, topology), topology, family.task(cfg, topology))
    arch = hf.hf_arch(cfg.model)
    hf_cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.LlamaForCausalLM
    # (special ids inside the vocabulary: GPT-2's config defaults to 50256)
    hf_cfg = hf_cls.config_class(**hf.config_to_hf(cfg.model), attn_implementation="sdpa", bos_token_id=0,
                                 eos_token_id=0)
    theirs = hf_cls(hf_cfg).to(device)
    theirs.load_state_dict(hf.to_hf({k: v.detach() for k, v in ours.model.state_dict().items()}, cfg.model))
    theirs.train()
    hf_optim = torch.optim.AdamW(theirs.parameters(), lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1,
                                 cfg.optimizer.beta2), eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay,
                                 fused=device.type == "cuda" or None)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (opts.batch, opts.seq_len + 1), generator=gen)
               for _ in range(opts.warmup + opts.steps)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if opts.precision == "bf16" else nullcontext()

    def hf_loss(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        with autocast:
            logits = theirs(input_ids=ids[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    with torch.no_grad():  # the same model: both give the same loss for the same weights, before any step
        theirs.eval()
        first_hf = hf_loss(batches[0]).item()
        theirs.train()
    first_ours = ours.eval_loss([{"input_ids": batches[0][:, :-1], "labels": batches[0][:, 1:]}])

    def hf_step(ids: torch.Tensor) -> None:
        hf_optim.zero_grad(set_to_none=True)
        hf_loss(ids).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), cfg.training.grad_clip)
        hf_optim.step()

    def our_step(ids: torch.Tensor) -> None:
        ours.train_step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], lr=cfg.optimizer.lr)

    clock = _Clock(device)
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    peaks = {"ours": 0, "hf": 0}
    for i, ids in enumerate(batches):
        for side, step in (("ours", our_step), ("hf", hf_step)) if i % 2 == 0 else (("hf", hf_step), ("ours", our_step)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                before = reset_host_peak()
            start = clock()
            step(ids)
            if i >= opts.warmup:
                times[side].append(clock() - start)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else host_peak_bytes()
                peaks[side] = max(peaks[side], peak - before)  # what the step adds: activations, gradients
    tokens = opts.batch * opts.seq_len
    flops_per_token = training_flops_per_token(cfg.model, opts.seq_len, causal=False)
    planned = estimate(cfg.model, Layout(seq_len=opts.seq_len, micro_batch=opts.batch, dtype=opts.precision,
                                         engine="deepspeed", zero=0, flash_attention=device.type == "cuda",
                                         overhead_bytes=0))
    planned_step = planned["breakdown"]["activations"] + planned["breakdown"]["gradients"]
    peak_flops, _ = mfu_peak(cfg)
    out = {"style": style, "params": sum(p.numel() for p in ours.model.parameters()), "first_loss_ours": first_ours,
           "first_loss_hf": first_hf, "flops_per_token": flops_per_token, "planned_bytes": planned_step,
           "peak_flops": peak_flops}
    for side in ("ours", "hf"):
        median = statistics.median(times[side])
        achieved = tokens / median * flops_per_token
        out[side] = {"step_s": median, "tokens_per_s": tokens / median, "tflops": achieved / 1e12,
                     "mfu": achieved / peak_flops if peak_flops else None, "peak_bytes": peaks[side]}
    return out
