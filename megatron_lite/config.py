"""Typed configuration tree: YAML files with ``base:`` inheritance plus dotted command-line overrides.

Every section is a dataclass, so the set of valid keys, their types and their defaults live in one place. Loading walks
the YAML tree against the dataclasses: an unknown key is an error that suggests the closest valid key, and a wrong type
or out-of-range value is an error that names the dotted key. No code is executed from config files.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_lite.errors import ConfigError, DataError



# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward layers of the decoder (``num_experts: 0``, the default, keeps them dense).

    Routing is dropless: every token reaches its ``top_k`` experts, so the result does not depend on how the batch is
    split. ``router: softmax`` is Mixtral's (probabilities over all experts, top-k taken, renormalized when
    ``normalize_top_k``); ``router: sigmoid`` is DeepSeek-V3's (independent sigmoid scores; a per-expert bias, moved by
    ``bias_update_rate`` after each step toward equal load, chooses the experts but never weighs them or enters the
    gradient). The balancing loss (Switch/GShard, per sequence) and the router z-loss are added to the training loss
    with their coefficients.
    """

    num_experts: int = 0
    top_k: int = 2
    every: int = 1  # layer i is a mixture when (i + 1) % every == 0 (Qwen-MoE's decoder_sparse_step)
    expert_ffn_size: int | None = None  # None: model.ffn_hidden_size (or its default)
    shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeek, Qwen-MoE): one MLP this many wide
    shared_expert_gate: bool = False  # Qwen-MoE: the shared experts' output scaled by sigmoid(a learned gate)
    router: Literal["softmax", "sigmoid"] = "softmax"
    normalize_top_k: bool = True  # weights of the chosen experts renormalized to sum to 1
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss, per sequence
    z_loss_coef: float = 0.0  # ST-MoE router z-loss: mean squared log-sum-exp of the router logits
    bias_update_rate: float = 0.0  # sigmoid router: the balancing bias step after each optimizer step (DeepSeek: 1e-3)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        return self.enabled and (index + 1) % self.every == 0

    def validate(self, where: str = "model.moe") -> None:
        if self.num_experts == 0:
            return
        _positive(self, where, "num_experts", "top_k", "every")
        if self.top_k > self.num_experts:
            raise ConfigError(f"{where}.top_k={self.top_k} exceeds {where}.num_experts={self.num_experts}")
        if self.expert_ffn_size is not None and self.expert_ffn_size <= 0:
            raise ConfigError(f"{where}.expert_ffn_size={self.expert_ffn_size} must be positive")
        _non_negative(self, where, "shared_experts", "aux_loss_coef", "z_loss_coef", "bias_update_rate")
        if self.shared_expert_gate and not self.shared_experts:
            raise ConfigError(f"{where}.shared_expert_gate=true needs {where}.shared_experts >= 1")
        if self.bias_update_rate and self.router != "sigmoid":
            raise ConfigError(f"{where}.bias_update_rate={self.bias_update_rate} needs {where}.router=sigmoid "
                              "(the balancing bias is DeepSeek-V3's sigmoid-router scheme)")


@dataclass
class ModelConfig:
    """Shape and options of the network. Covers GPT-2 and Llama style decoders, and T5 and original-Transformer
    style encoder-decoders (``family: encoder_decoder``)."""

    family: Literal["decoder", "encoder_decoder"] = "decoder"
    vocab_size: int = 50257
    pad_vocab_multiple: int = 128
    hidden_size: int = 768
    num_layers: int = 12
    num_decoder_layers: int | None = None  # encoder_decoder: decoder layers (num_layers is the encoder's); None: same
    num_heads: int = 12
    kv_channels: int | None = None  # encoder_decoder: width of one head; None: hidden_size / num_heads (T5 small: 64)
    num_kv_heads: int | None = None  # None: same as num_heads (MHA); 1: MQA; otherwise GQA
    ffn_hidden_size: int | None = None  # None: 4*hidden (gelu/relu) or the Llama rule for swiglu
    max_seq_len: int = 1024
    position: Literal["learned", "sinusoidal", "rotary", "relative"] = "learned"  # relative: T5's bucketed bias
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.x long context: {rope_type: llama3, factor, low_freq_factor, ...}
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_position: Literal["pre", "post"] = "pre"
    # gelu_tanh: GPT-2's approximation; geglu: gated gelu_tanh (T5 v1.1, encoder_decoder only)
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"] = "gelu"
    bias: bool = True
    qkv_bias: bool | None = None  # biases on the q, k and v projections; None: same as bias (Qwen2: true, bias false)
    tie_embeddings: bool = True
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    init_std: float = 0.02
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(hidden_size), as the original Transformer does
    scale_attn_logits: bool = True  # False: no 1/sqrt(head_dim) on attention logits (T5 folds it into its init)
    scale_decoder_output: bool = False  # encoder_decoder: hidden_size^-0.5 before a tied head (the original T5)
    decoder_start_token_id: int = 0  # encoder_decoder: first decoder input (T5 uses its pad id, 0)
    scaled_residual_init: bool = True  # std / sqrt(2 * num_layers) on residual output projections
    activation_checkpointing: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)  # decoder only: mixture-of-experts feed-forward layers

    def validate(self, where: str = "model") -> None:
        _positive(self, where, "vocab_size", "pad_vocab_multiple", "hidden_size", "num_layers", "num_heads", "max_seq_len")
        if self.family == "decoder":
            encdec_only = {
                "num_decoder_layers": self.num_decoder_layers is not None,
                "kv_channels": self.kv_channels is not None,
                "position": self.position == "relative", "activation": self.activation == "geglu",
                "scale_attn_logits": not self.scale_attn_logits, "scale_decoder_output": self.scale_decoder_output,
            }
            for key in (k for k, used in encdec_only.items() if used):
                raise ConfigError(f"{where}.{key}={getattr(self, key)!r} is only supported with "
                                  f"{where}.family=encoder_decoder")
        else:
            if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
                raise ConfigError(f"{where}.num_decoder_layers={self.num_decoder_layers} must be positive")
            if self.kv_channels is not None and self.kv_channels <= 0:
                raise ConfigError(f"{where}.kv_channels={self.kv_channels} must be positive")
            if self.position == "rotary":
                raise ConfigError(f"{where}.position=rotary is not supported with {where}.family=encoder_decoder; "
                                  "use relative, sinusoidal or learned")
            if self.kv_heads != self.num_heads:
                raise ConfigError(f"{where}.num_kv_heads={self.num_kv_heads} must be null with "
                                  f"{where}.family=encoder_decoder (multi-head attention only)")
            if not 0 <= self.decoder_start_token_id < self.vocab_size:
                raise ConfigError(f"{where}.decoder_start_token_id={self.decoder_start_token_id} must be a token id "
                                  f"below {where}.vocab_size={self.vocab_size}")
            _positive(self, where, "relative_attention_num_buckets", "relative_attention_max_distance")
        if self.kv_channels is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{where}.hidden_size={self.hidden_size} must be divisible by {where}.num_heads={self.num_heads}"
            )
        kv = self.kv_heads
        if kv < 1 or self.num_heads % kv:
            raise ConfigError(f"{where}.num_kv_heads={kv} must be >= 1 and divide {where}.num_heads={self.num_heads}")
        if self.position == "rotary" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head dim, got {self.head_dim} ({where}.hidden_size/num_heads)")
        for name in ("embedding_dropout", "attention_dropout", "residual_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{where}.{name}={value} must be in [0, 1)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            needed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if kind != "llama3" or not needed <= set(self.rope_scaling):
                raise ConfigError(
                    f"{where}.rope_scaling={self.rope_scaling} must have rope_type: llama3 and the keys "
                    f"{', '.join(sorted(needed))}"
                )
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            raise ConfigError(f"{where}.ffn_hidden_size={self.ffn_hidden_size} must be positive")
        _positive(self, where, "norm_eps", "init_std", "rope_theta")
        self.moe.validate(f"{where}.moe")
        if self.moe.enabled:
            if self.family != "decoder":
                raise ConfigError(f"{where}.moe.num_experts={self.moe.num_experts} needs {where}.family=decoder")
            if self.activation != "swiglu":
                raise ConfigError(f"{where}.moe needs {where}.activation=swiglu (SwiGLU experts), "
                                  f"got {self.activation!r}")

    @property
    def expert_ffn_size(self) -> int:
        return self.moe.expert_ffn_size or self.ffn_size

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_heads

    @property
    def decoder_layers(self) -> int:
        """Decoder layers of an encoder-decoder (``num_layers`` counts the encoder's)."""
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.activation == "swiglu":  # Llama: 2/3 of 4h, rounded up to a multiple of 256
            return (int(8 * self.hidden_size / 3) + 255) // 256 * 256
        return 4 * self.hidden_size


@dataclass
class DataConfig:
    """Which tokenized shards to read and how to cut them into samples."""

    prefixes: str | list = ""  # "0.7 web 0.3 code", or a list of prefixes / alternating weights and prefixes
    split: str = "98,1,1"  # train, valid, test weights by documents
    seq_len: int = 1024
    seed: int = 1234
    tokenizer: str | None = None  # tokenizer.json or HF tokenizer dir (used for the vocabulary size check and logs)
    reset_at_document: bool = False  # stop attention and reset positions at document boundaries
    packing: Literal["packed", "padded"] = "packed"  # padded: one document per sample, truncated and right-padded
    # encoder-decoder objectives: T5 span corruption of the packed stream, or aligned source/target shards
    objective: Literal["causal_lm", "span_corruption", "seq2seq"] = "causal_lm"
    target_seq_len: int | None = None  # seq2seq: target tokens per sample; None: seq_len
    noise_density: float = 0.15  # span_corruption: share of tokens hidden
    mean_noise_span_length: float = 3.0  # span_corruption: mean tokens per hidden span
    cache_dir: str | None = None  # where sample indices are cached (per node); None: the data module's default
    prefetch: int = 2  # global batches prefetched by a background thread (0: synchronous)

    def validate(self, where: str = "data") -> None:
        _positive(self, where, "seq_len")
        if self.prefetch < 0:
            raise ConfigError(f"{where}.prefetch={self.prefetch} must be >= 0")
        _check_split(self.split, f"{where}.split")
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"{where}.noise_density={self.noise_density} must be in (0, 1)")
        _positive(self, where, "mean_noise_span_length")
        if self.target_seq_len is not None and self.target_seq_len <= 0:
            raise ConfigError(f"{where}.target_seq_len={self.target_seq_len} must be positive")
        if self.objective != "causal_lm" and (self.packing == "padded" or self.reset_at_document):
            raise ConfigError(f"{where}.objective={self.objective} sets its own packing; leave {where}.packing "
                              f"and {where}.reset_at_document at their defaults")
        if self.packing == "padded" and self.reset_at_document:
            raise ConfigError(
                f"{where}.reset_at_document=true has no effect with {where}.packing=padded (a sample is one document)"
            )


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    no_decay_norms: bool = True
    no_decay_biases: bool = True
    no_decay_embeddings: bool = True
    fused: bool | None = None  # None: fused on GPU, plain on CPU

    def skips_weight_decay(self, name: str, ndim: int, embedding: bool) -> bool:
        """Whether parameter ``name`` (of ``ndim`` dimensions in full; an embedding table or not) gets no weight decay.

        The one home of this rule, for the optimizer (``step/optim.py``) and the memory model (``planning``):
        embedding tables, biases (parameters named ``bias``) and the other 1-D tensors (norm scales), each switchable.
        """
        if embedding:
            return self.no_decay_embeddings
        if name.rsplit(".", 1)[-1] == "bias":
            return self.no_decay_biases
        return self.no_decay_norms if ndim < 2 else False

    def validate(self, where: str = "optimizer") -> None:
        _positive(self, where, "lr", "eps")
        _non_negative(self, where, "min_lr", "weight_decay")
        if self.min_lr > self.lr:  # the schedule would climb from lr to min_lr
            raise ConfigError(f"{where}.min_lr={self.min_lr} must not exceed {where}.lr={self.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be in [0, 1)")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over optimizer steps."""

    kind: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd"] = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: training.train_steps - warmup_steps
    wsd_decay_fraction: float = 0.2  # warmup-stable-decay: the final fraction of decay_steps spent decaying
    wsd_decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"

    def validate(self, where: str = "schedule") -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps={self.warmup_steps} must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(f"{where}.decay_steps={self.decay_steps} must be positive")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(f"{where}.wsd_decay_fraction={self.wsd_decay_fraction} must be in (0, 1]")


@dataclass
class TrainingConfig:
    train_steps: int = 1000
    global_batch_size: int = 8  # samples per optimizer step (across all data-parallel ranks)
    global_batch_tokens: int | None = None  # alternative to global_batch_size: tokens per step (divided by seq_len)
    micro_batch_size: int = 1  # samples per forward/backward on one rank
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    label_smoothing: float = 0.0
    compile: bool = False
    seed: int = 1234
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_samples: int = 64
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 disables
    max_skipped_steps: int = 20  # non-finite (skipped) steps in a row before the run stops; 0: never stop
    loss_spike_factor: float = 0.0  # log a loss above this factor x the recent mean; 0 disables

    def validate(self, where: str = "training") -> None:
        _positive(self, where, "train_steps", "global_batch_size", "micro_batch_size", "eval_samples")
        if self.global_batch_tokens is not None and self.global_batch_tokens <= 0:
            raise ConfigError(f"{where}.global_batch_tokens={self.global_batch_tokens} must be positive")
        if self.grad_clip < 0:
            raise ConfigError(f"{where}.grad_clip={self.grad_clip} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{where}.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _non_negative(self, where, "eval_interval", "early_stopping_patience", "max_skipped_steps", "loss_spike_factor")


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <logging.run_dir>/checkpoints
    interval: int = 0  # save every N steps; 0: only at the end
    keep_last: int = 3
    resume: bool = True  # resume from <dir>/latest when it exists
    load: str | None = None  # a checkpoint directory to start from (weights, optimizer, data position)
    # weights only, from our checkpoint or an HF model directory: a new optimizer, schedule and data position
    # (fine-tuning, continued pretraining); <dir>/latest still wins when it exists
    init_from: str | None = None

    def validate(self, where: str = "checkpoint") -> None:
        _non_negative(self, where, "interval")
        _positive(self, where, "keep_last")
        if self.load and self.init_from:
            raise ConfigError(f"{where}.load and {where}.init_from are both set: load resumes a run (weights, "
                              "optimizer, data position), init_from takes weights only; give one")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with an API key, else offline
    wandb_project: str = "megatron_lite"
    wandb_run_name: str | None = None
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: looked up by device name

    def validate(self, where: str = "logging") -> None:
        _positive(self, where, "log_interval")
        if self.peak_flops is not None:
            _positive(self, where, "peak_flops")


@dataclass
class ParallelConfig:
    """How the model is spread over processes. One process uses the single-device engine."""

    engine: Literal["auto", "single", "ddp", "deepspeed", "fsdp"] = "auto"  # auto: single for 1 rank, else ddp
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: each sample's sequence split over cp ranks (load-balanced causal chunks)
    ep: int = 1  # expert parallelism: the experts of each mixture layer split over ep of the data-parallel ranks
    sequence_parallel: bool = False  # with tp > 1: norms and dropout on sequence shards (all-gather / reduce-scatter)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved", "zb"] = "1f1b"  # zb: interleaved zero-bubble
    pp_virtual_stages: int = 2  # stages per pipeline rank for the interleaved and zb schedules
    pp_layers: list | None = None  # layers per stage (pp x virtual stages entries); None: balanced by parameters
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True
    dp_replicate: int = 1  # HSDP: replicas x shards; dp_shard = dp / dp_replicate
    fsdp_cpu_offload: bool = False
    deepspeed_overrides: dict = field(default_factory=dict)
    timeout_s: float = 1800.0  # a collective waiting longer than this on a peer fails, naming the peer

    def validate(self, where: str = "parallel") -> None:
        _positive(self, where, "tp", "pp", "cp", "ep", "dp_replicate", "timeout_s")
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"{where}.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        encdec = self.model.family == "encoder_decoder"
        if encdec != (self.data.objective != "causal_lm"):
            raise ConfigError(
                f"data.objective={self.data.objective} does not train model.family={self.model.family}; use "
                + ("span_corruption or seq2seq" if encdec else "causal_lm (or model.family=encoder_decoder)")
            )
        if (self.data.target_seq_len or 0) > self.model.max_seq_len:
            raise ConfigError(f"data.target_seq_len={self.data.target_seq_len} exceeds "
                              f"model.max_seq_len={self.model.max_seq_len}")
        self.global_batch_size  # noqa: B018 -- raises when global_batch_tokens does not divide into samples
        return self

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, from global_batch_size or global_batch_tokens."""
        t = self.training
        if t.global_batch_tokens is None:
            return t.global_batch_size
        if t.global_batch_tokens % self.data.seq_len:
            raise ConfigError(
                f"training.global_batch_tokens={t.global_batch_tokens} is not a multiple of data.seq_len={self.data.seq_len}"
            )
        return t.global_batch_tokens // self.data.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def microbatches_per_rank(samples: int, micro_batch: int, dp: int, what: str = "training.global_batch_size") -> int:
    """How many microbatches each of ``dp`` data-parallel ranks runs for ``samples`` samples (a global batch, or the
    evaluation samples); a ConfigError naming ``what`` when they do not split into whole microbatches on every rank.

    The one home of this rule: the trainer, the DeepSpeed config and the data loader all ask it.
    """
    if samples % (micro_batch * dp):
        raise ConfigError(
            f"{what}={samples} is not divisible by training.micro_batch_size={micro_batch} "
            f"x data-parallel size {dp} (= {micro_batch * dp})"
        )
    return samples // (micro_batch * dp)


def _positive(section: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"{where}.{name}={value} must be positive")


def _non_negative(section: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value < 0:
            raise ConfigError(f"{where}.{name}={value} must be >= 0")


def parse_split(split: str | list | tuple) -> list[float]:
    """Normalized weights for train, valid and test; missing trailing parts weigh 0."""
    parts = split if isinstance(split, (list, tuple)) else str(split).replace("/", ",").split(",")
    try:
        w = [float(x) for x in parts if str(x).strip() != ""]
    except ValueError:
        raise DataError(f"split '{split}': expected up to three numbers such as '98,1,1'") from None
    if not 1 <= len(w) <= 3 or any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise DataError(f"split '{split}': expected one to three non-negative weights with a positive sum, "
                        f"such as '98,1,1'")
    w += [0.0] * (3 - len(w))
    total = sum(w)
    return [x / total for x in w]


def _check_split(split: str | list, key: str) -> None:
    """Train/valid/test weights, checked by the same parser the data pipeline uses, so the error names the key."""
    try:
        parse_split(split)
    except DataError as e:
        raise ConfigError(f"{key}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    """The settings a YAML config file holds, merged over its ``base:`` chain exactly as ``load_config`` reads them:
    what the file itself sets, before defaults and overrides are applied (the planner tells the two apart)."""
    return _read_yaml(Path(path))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file and merge it over its ``base:`` (a path relative to the file), recursively."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base:' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    try:
        _check_keys(raw, Config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if base is None:
        return raw
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, _read_yaml((path.parent / str(b)), seen + (path,)))
    return _deep_merge(merged, raw)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "deepspeed_overrides":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where it is lossless (int -> float, str numbers)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} must not be null")
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} does not match {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if isinstance(value, base):
            return value
        raise ConfigError(f"{key}={value!r} must be a {base.__name__}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, naming the dotted key of any error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(_unknown_key(key, list(fields), where))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _unknown_key(key: str, valid: list[str], where: str) -> str:
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return f"unknown config key '{prefix}{key}'{hint}"


def _check_keys(data: Any, cls: type, where: str = "") -> None:
    """Reject unknown keys before merging, so the error names the file or override that holds the key."""
    if not isinstance(data, dict):
        return  # a non-mapping section is reported, with its key, when the merged config is built
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key(str(key), names, where))
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(value, hints[key], f"{where}.{key}" if where else str(key))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a plain nested dict (for example one saved with a checkpoint)."""
    return _build(Config, data, "").validate()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (with its ``base:`` chain), apply dotted ``overrides`` like ``training.micro_batch_size=4``."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        try:
            _check_keys(nested, Config)
        except ConfigError as e:
            raise ConfigError(f"override '{text}': {e}") from None
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    try:
        return config_from_dict(data)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise


def config_hash(cfg: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
