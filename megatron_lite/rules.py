"""Whether a config can run on a layout: every such rule, as pure functions of the config, the world size and the
device type, each refusing in one line that names the key.

Training asks here before it builds anything (``check_layout``), and so do the engines when built directly, the
planner's search (``planning/runnable.py``), the dry run and the bad-input catalogue: a layout is refused by the same
words wherever it is tried, and nothing else refuses one. ``Config.validate`` keeps what makes a config well-formed
on its own (types, ranges, which objective trains which family); the rules here are about running it: sizes that
must divide, settings an engine would ignore or reject, what a pipeline schedule needs per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config import Config, ParallelConfig, microbatches_per_rank
from megatron_lite.errors import ConfigError

ENGINES = ("single", "ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class Sizes:
    """The axis sizes a world of ``world`` ranks has under ``cfg.parallel``."""

    world: int
    pp: int
    dp: int
    tp: int
    dp_replicate: int
    cp: int = 1

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate


def data_parallel_size(par: ParallelConfig, world: int) -> int:
    """The data axis of ``world`` ranks: tp x pp (x cp) must divide the world, and dp_replicate the data axis."""
    model = par.tp * par.pp * par.cp
    if world % model:
        cp = f" x parallel.cp={par.cp}" if par.cp > 1 else ""
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tp={par.tp} x parallel.pp={par.pp}{cp} (= {model})"
        )
    dp = world // model
    if dp % par.dp_replicate:
        raise ConfigError(f"data-parallel size {dp} is not divisible by parallel.dp_replicate={par.dp_replicate}")
    return dp


def sizes(cfg: Config, world: int) -> Sizes:
    """Split ``world`` ranks into (pp, dp, tp)."""
    par = cfg.parallel
    return Sizes(world, par.pp, data_parallel_size(par, world), par.tp, par.dp_replicate, par.cp)


def engine_name(cfg: Config, world: int) -> str:
    """``parallel.engine`` with ``auto`` resolved: one process runs the single engine, several run DDP."""
    name = cfg.parallel.engine
    if name == "auto":
        name = "single" if world == 1 else "ddp"
    if name == "single" and world > 1:
        raise ConfigError(
            f"parallel.engine=single runs one process, but {world} ranks were launched; use ddp, fsdp or deepspeed"
        )
    return name


def check_layout(cfg: Config, world: int, device_type: str | None) -> str:
    """Every rule for running ``cfg`` on ``world`` ranks of ``device_type`` ("cpu", "cuda"); the engine's name.
    ``device_type`` None: every rule but those about the device (the entry point asks so before it imports torch,
    which finding the device needs, and training asks again with it)."""
    size = sizes(cfg, world)
    name = engine_name(cfg, world)
    check_batch(cfg, size.dp)
    check_engine_settings(cfg, name, device_type)
    check_pipeline(cfg, name, size.dp)
    check_tensor_parallel(cfg)
    check_context_parallel(cfg)
    check_experts(cfg, name, size.dp)
    return name


def check_batch(cfg: Config, dp: int) -> int:
    """The global batch and the evaluation samples split evenly into data-parallel ranks and microbatches; the
    global batch size."""
    gbs, mbs = cfg.global_batch_size, cfg.training.micro_batch_size
    microbatches_per_rank(gbs, mbs, dp)
    microbatches_per_rank(cfg.training.eval_samples, mbs, dp, "training.eval_samples")
    return gbs


def check_engine_settings(cfg: Config, name: str, device_type: str | None) -> None:
    """Settings the chosen engine would ignore or reject."""
    par, precision = cfg.parallel, cfg.training.precision
    if par.zero_stage > 0 and name != "deepspeed":
        raise ConfigError(
            f"parallel.zero_stage={par.zero_stage} needs parallel.engine=deepspeed (got {name}); "
            "for ZeRO-3-style sharding with PyTorch use parallel.engine=fsdp"
        )
    for flag in ("offload_optimizer", "offload_params"):
        if getattr(par, flag) and name != "deepspeed":
            raise ConfigError(
                f"parallel.{flag} is a DeepSpeed ZeRO setting (got parallel.engine={name}); "
                "with fsdp use parallel.fsdp_cpu_offload"
            )
    if par.offload_params and par.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params needs parallel.zero_stage=3 (got {par.zero_stage})")
    if par.offload_optimizer and par.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
    if name == "deepspeed" and par.pp > 1 and par.zero_stage >= 2:
        raise ConfigError(
            f"parallel.zero_stage={par.zero_stage} with parallel.pp={par.pp}: DeepSpeed's pipeline engine supports "
            "ZeRO stage 0 or 1 only; use zero_stage<=1, or parallel.engine=fsdp for sharded data parallelism with "
            "pipeline parallelism"
        )
    if par.pp > 1 and precision == "fp16":
        raise ConfigError(
            f"training.precision=fp16 with parallel.pp={par.pp}: the pipeline schedules run without a loss scaler; "
            "use bf16"
        )
    if par.tp > 1 and name == "deepspeed" and par.zero_stage == 3:
        raise ConfigError(
            f"parallel.zero_stage=3 with parallel.tp={par.tp} is not supported: ZeRO-3 would partition the "
            "tensor-parallel shards again; use zero_stage 1 or 2, or parallel.engine=fsdp (FSDP2 over the data axis)"
        )
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1 (it splits the sequence over the tp group)")
    if par.fsdp_cpu_offload and name != "fsdp":
        raise ConfigError(
            f"parallel.fsdp_cpu_offload needs parallel.engine=fsdp (got {name}); "
            "with deepspeed use parallel.offload_optimizer / offload_params"
        )
    if par.dp_replicate > 1 and name != "fsdp":
        raise ConfigError(f"parallel.dp_replicate={par.dp_replicate} (HSDP) needs parallel.engine=fsdp (got {name})")
    if name == "fsdp" and precision == "fp16":
        raise ConfigError(
            "training.precision=fp16 is not supported by parallel.engine=fsdp (FSDP2 has no sharded loss scaler); "
            "use bf16, or fp16 with the ddp or deepspeed engine"
        )
    if name == "fsdp" and par.fsdp_cpu_offload and device_type not in ("cuda", None):
        raise ConfigError(
            "parallel.fsdp_cpu_offload offloads parameters from GPU to CPU memory; it is not supported when "
            f"training on {device_type} (parameters already live in host memory)"
        )
    if name == "deepspeed" and precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            "training.precision=fp16 with parallel.engine=deepspeed needs a GPU (DeepSpeed's cpu accelerator has no "
            "fp16); use bf16, or fp16 with the ddp engine"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline parallelism
# ----------------------------------------------------------------------------------------------------------------------


def virtual_stages(cfg: Config) -> int:
    """Stages per pipeline rank: ``pp_virtual_stages`` for the interleaved schedules, else 1."""
    return cfg.parallel.pp_virtual_stages if cfg.parallel.pp_schedule in ("interleaved", "zb") else 1


def num_blocks(cfg: Config) -> tuple[int, str]:
    """The model's blocks, and the config keys that count them (an encoder-decoder's encoder and decoder)."""
    m = cfg.model
    if m.family == "encoder_decoder":
        n = m.num_layers + m.decoder_layers
        return n, f"model.num_layers + num_decoder_layers={n}"
    return m.num_layers, f"model.num_layers={m.num_layers}"


def check_pipeline(cfg: Config, name: str, dp: int) -> None:
    """What the schedule needs per step, and a stage for every layer."""
    par = cfg.parallel
    if par.pp == 1:
        return
    if par.pp_virtual_stages < 1:
        raise ConfigError(f"parallel.pp_virtual_stages={par.pp_virtual_stages} must be positive")
    if par.pp_schedule == "zb" and cfg.model.family == "encoder_decoder":
        raise ConfigError(
            "parallel.pp_schedule=zb is not supported for model.family=encoder_decoder (torch's split input/weight "
            "backward fails on its stages, which take the encoder output): use 1f1b, gpipe or interleaved"
        )
    m = microbatches_per_rank(cfg.global_batch_size, cfg.training.micro_batch_size, dp)
    if par.pp_schedule == "1f1b" and m < par.pp:
        bubble = (par.pp - 1) / (m + par.pp - 1)
        raise ConfigError(
            f"parallel.pp_schedule=1f1b needs at least parallel.pp={par.pp} microbatches per step, got {m} "
            f"(training.global_batch_size / (micro_batch_size x dp)); the bubble would be {bubble:.0%} of the step: "
            "raise the global batch or lower the micro batch"
        )
    rounds = max(1, m // par.pp)  # the interleaved schedules run the microbatches in equal rounds
    if par.pp_schedule in ("interleaved", "zb") and m % rounds:
        raise ConfigError(
            f"parallel.pp_schedule={par.pp_schedule} cannot run {m} microbatches per step "
            f"(training.global_batch_size / (micro_batch_size x dp)) in {rounds} equal rounds of about parallel.pp="
            f"{par.pp}: use a multiple of {par.pp}, or fewer than {2 * par.pp}"
        )
    check_stage_layers(cfg)


def check_stage_layers(cfg: Config) -> list[int] | None:
    """Every one of the ``pp x v`` stages needs a layer; ``parallel.pp_layers``, when given, must list a positive
    count per stage adding up to the model's blocks. Returns those counts (None: balance by parameters)."""
    par = cfg.parallel
    layers, key = num_blocks(cfg)
    stages = par.pp * virtual_stages(cfg)
    if par.pp_layers is not None:
        counts = list(par.pp_layers)
        if len(counts) != stages or any(not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != layers:
            raise ConfigError(
                f"parallel.pp_layers={counts} must give {stages} positive layer counts (parallel.pp={par.pp} x "
                f"{virtual_stages(cfg)} stages per rank) that add up to {key}"
            )
        return counts
    if stages > layers:
        raise ConfigError(
            f"{stages} pipeline stages (parallel.pp={par.pp} x {virtual_stages(cfg)} per rank) for "
            f"{key}: every stage needs at least one layer"
        )
    return None


def check_stage_sharing(cfg: Config, ranges: list[range], parts: list[dict[str, list[int]]]) -> None:
    """FSDP2 makes each pipeline stage a root that owns the parameters outside its blocks, so no tensor may be used
    by two stages of one rank (an encoder-decoder's embedding when the encoder's and the decoder's first stages share
    a rank). ``parts[s]``: the parts besides blocks that stage ``s`` uses, each with the ids of its tensors."""
    if cfg.parallel.engine != "fsdp":
        return
    pp, seen = cfg.parallel.pp, {}
    for s, used in enumerate(parts):
        for name in sorted(used):
            for pid in used[name]:
                first = seen.setdefault((pid, s % pp), s)
                if first != s:
                    raise ConfigError(
                        f"parallel.engine=fsdp with parallel.pp_schedule={cfg.parallel.pp_schedule}: pipeline stages "
                        f"{first} and {s} (blocks {ranges[first].start}-{ranges[first].stop - 1} and "
                        f"{ranges[s].start}-{ranges[s].stop - 1}) share {name} on pipeline rank {s % pp}, which FSDP2 "
                        "cannot shard in two stage roots; use parallel.pp_layers that keep them on different ranks, "
                        "parallel.pp_schedule=1f1b or gpipe, or parallel.engine=ddp or deepspeed"
                    )


# ----------------------------------------------------------------------------------------------------------------------
# Tensor parallelism
# ----------------------------------------------------------------------------------------------------------------------


def check_tensor_parallel(cfg: Config) -> None:
    """Shapes the tensor-parallel group must split, naming the key."""
    tp, m = cfg.parallel.tp, cfg.model
    if tp == 1:
        return
    heads, kv = m.num_heads, m.kv_heads
    if heads % tp:
        raise ConfigError(f"model.num_heads={heads} is not divisible by parallel.tp={tp}")
    if kv % tp and (heads // kv) % (heads // tp):
        raise ConfigError(
            f"model.num_kv_heads={kv} with parallel.tp={tp}: the group must divide the kv heads, or each rank's "
            f"{heads // tp} query heads must share one kv head (they use {heads // kv} query heads per kv head)"
        )
    if m.ffn_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tp={tp}")
    if m.padded_vocab_size % tp:
        raise ConfigError(
            f"the padded vocabulary ({m.padded_vocab_size} = model.vocab_size={m.vocab_size} rounded up to "
            f"model.pad_vocab_multiple={m.pad_vocab_multiple}) is not divisible by parallel.tp={tp}"
        )
    if cfg.parallel.sequence_parallel and m.family == "encoder_decoder":
        raise ConfigError("parallel.sequence_parallel is not supported for model.family=encoder_decoder; use "
                          "parallel.tp alone")
    if cfg.parallel.sequence_parallel and cfg.data.seq_len % tp:
        raise ConfigError(
            f"parallel.sequence_parallel needs data.seq_len={cfg.data.seq_len} divisible by parallel.tp={tp}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Context parallelism
# ----------------------------------------------------------------------------------------------------------------------


def check_context_parallel(cfg: Config) -> None:
    """The sequence splits into 2 x cp equal chunks (each cp rank takes one from each end, so every rank does the
    same causal work); the decoder family only; under sequence parallelism each rank's part splits again over tp."""
    cp, tp = cfg.parallel.cp, cfg.parallel.tp
    if cp == 1:
        return
    if cfg.model.family == "encoder_decoder":
        raise ConfigError("parallel.cp is not supported for model.family=encoder_decoder (its cross-attention reads "
                          "the whole encoder output); use parallel.tp or parallel.pp")
    if cfg.data.seq_len % (2 * cp):
        raise ConfigError(f"parallel.cp={cp} needs data.seq_len={cfg.data.seq_len} divisible by 2 x cp = {2 * cp} "
                          "(each rank takes a chunk from each end of the sequence)")
    if cfg.parallel.sequence_parallel and (cfg.data.seq_len // cp) % tp:
        raise ConfigError(f"parallel.sequence_parallel with parallel.cp={cp}: each rank's {cfg.data.seq_len // cp} "
                          f"tokens must split over parallel.tp={tp}")


# ----------------------------------------------------------------------------------------------------------------------
# Mixture of experts and expert parallelism
# ----------------------------------------------------------------------------------------------------------------------


def check_experts(cfg: Config, engine: str, dp: int) -> None:
    """Mixture layers take their balancing loss per whole sequence, which context parallelism sums over its ranks and
    sequence parallelism would not; the ep group is carved from the data-parallel ranks and splits the experts
    evenly."""
    par, moe = cfg.parallel, cfg.model.moe
    if moe.enabled and par.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel with model.moe is not supported (each tp rank would route its "
                          "own slice of the sequence, and the mixture layers' gradients would need a tp reduction); "
                          "use parallel.tp alone")
    if moe.enabled and cfg.training.precision == "fp16":
        raise ConfigError("training.precision=fp16 with model.moe is not supported (the auxiliary losses' gradient "
                          "would miss the fp16 loss scale); use bf16")
    ep = par.ep
    if ep == 1:
        return
    if not moe.enabled:
        raise ConfigError(f"parallel.ep={ep} needs mixture-of-experts layers (model.moe.num_experts > 0)")
    if dp % ep:
        raise ConfigError(f"parallel.ep={ep} must divide the data-parallel size {dp} (the ep group is carved from "
                          "the data-parallel ranks)")
    if moe.num_experts % ep:
        raise ConfigError(f"model.moe.num_experts={moe.num_experts} is not divisible by parallel.ep={ep}")
    if par.dp_replicate > 1:
        raise ConfigError(f"parallel.ep={ep} with parallel.dp_replicate={par.dp_replicate}: HSDP with expert "
                          "parallelism is not supported; use plain FSDP (dp_replicate: 1)")
    if engine == "deepspeed" and par.zero_stage not in (1, 2):
        raise ConfigError(f"parallel.ep={ep} with parallel.engine=deepspeed and parallel.zero_stage={par.zero_stage} "
                          "is not supported (the experts stay outside ZeRO 1-2 only); use parallel.zero_stage=1 or 2, "
                          "or parallel.engine=fsdp or ddp")


# ----------------------------------------------------------------------------------------------------------------------
# A launched run
# ----------------------------------------------------------------------------------------------------------------------


def check_run_settings(cfg: Config) -> None:
    """Settings that are legal for a smoke test of a step or two but a mistake in a launched run: the entry point
    (``launch/pretrain.py``) refuses them, library calls (tests, the parity harness) do not."""
    warmup, steps = cfg.schedule.warmup_steps, cfg.training.train_steps
    if warmup > steps:
        raise ConfigError(
            f"schedule.warmup_steps={warmup} is longer than training.train_steps={steps}: the learning rate would "
            "never reach optimizer.lr; shorten the warmup or train longer"
        )
