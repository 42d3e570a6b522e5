"""The encoder-decoder family: one implementation whose options cover T5 (v1.1 and the original) and the original
Transformer ("Attention Is All You Need").

- **T5 v1.1**: relative position buckets (one bias table per stack, computed once and shared by its layers; none in
  cross-attention), no 1/sqrt(d) on the logits (folded into the init), pre-norm RMS norms without bias, no biases
  anywhere, gated-GELU MLP, untied head.
- **The original T5**: the same with a ReLU MLP and the head tied to the embedding, the decoder output scaled by
  hidden_size^-0.5 before it (``scale_decoder_output``).
- **The original Transformer**: sinusoidal positions, post-norm LayerNorm, ReLU MLP, biases, one vocabulary whose
  embedding is shared by encoder, decoder and head and scaled by sqrt(hidden_size) on the way in.

The blocks live in one ``layers`` ModuleDict keyed by global index, encoder blocks first ("0" .. "E-1") and decoder
blocks after them ("E" .. "E+D-1"), so that activation checkpointing, compile and FSDP wrap them as they wrap the
decoder family's, and names never depend on the layout. Teacher forcing: the decoder input is the target shifted right
behind ``decoder_start_token_id`` (:func:`shift_right`).

Masks: encoder self-attention sees real tokens only (``padding_mask``); decoder self-attention is causal (and, with
``decoder_padding_mask``, sees real targets only); cross-attention sees the encoder's real tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.init import InitRule, build_initialized, child_numel, distinct_numel
from megatron_lite.models.layers import (
    MLP,
    NORM_TYPES,
    Attention,
    KVCache,
    RelativePositionBias,
    SinusoidalPositions,
    build_attention_mask,
    make_norm,
)
from megatron_lite.constants import IGNORE_INDEX


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int = 0) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``start, y_0, ..., y_{t-2}``; ignored labels (-100) become ``pad``."""
    out = labels.new_full(labels.shape, start_token_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, pad_token_id)


class _Residual(nn.Module):
    """Shared by both blocks: a residual branch around ``f`` with pre-norm (x + f(norm(x))) or post-norm
    (norm(x + f(x))), dropout on the branch."""

    pre_norm: bool
    dropout: nn.Dropout

    def _branch(self, norm: nn.Module, x: torch.Tensor, f) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(f(norm(x)))
        return norm(x + self.dropout(f(x)))


def _attention(cfg: ModelConfig) -> Attention:
    scale = None if cfg.scale_attn_logits else 1.0
    return Attention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.head_dim, cfg.bias, cfg.attention_dropout,
                     scale=scale)


class EncoderBlock(_Residual):
    """Bidirectional self-attention then MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.bias)
        self.attn = _attention(cfg)
        self.mlp_norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, cfg.activation, cfg.bias)
        self.dropout = nn.Dropout(cfg.residual_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self._branch(self.attn_norm, x, lambda h: self.attn(h, mask=mask, bias=bias))
        return self._branch(self.mlp_norm, x, self.mlp)


class DecoderBlock(_Residual):
    """Causal self-attention, cross-attention to the encoder's output (``memory``), then MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.bias)
        self.attn = _attention(cfg)
        self.cross_norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.bias)
        self.cross_attn = _attention(cfg)
        self.mlp_norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, cfg.activation, cfg.bias)
        self.dropout = nn.Dropout(cfg.residual_dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cache: tuple[KVCache, KVCache] | None = None,
    ) -> torch.Tensor:
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = self._branch(self.attn_norm, x,
                         lambda h: self.attn(h, mask=mask, causal=True, bias=bias, cache=self_cache))
        x = self._branch(self.cross_norm, x,
                         lambda h: self.cross_attn(h, mask=memory_mask, kv=memory, cache=cross_cache))
        return self._branch(self.mlp_norm, x, self.mlp)


_ATTENTION_PLAN = {
    f"layers.*.{attn}.{proj}": kind
    for attn in ("attn", "cross_attn")
    for proj, kind in (("q_proj", "column"), ("k_proj", "kv"), ("v_proj", "kv"), ("o_proj", "row"))
}


class EncoderDecoderLM(nn.Module):
    """Sequence to sequence: source ids [b, s] and decoder input ids [b, t] -> logits [b, t, padded_vocab_size]."""

    # How tensor parallelism splits this model, as data (``parallel/plans.py`` applies it). The relative-bias tables
    # ([1, heads, q, k] out) stay whole and return only this rank's heads.
    TP_PLAN = {
        "layers": {
            "embed": "vocab",  # shared by the encoder, the decoder and a tied head
            **_ATTENTION_PLAN,  # self- and cross-attention split by heads alike
            "layers.*.mlp.gate_proj": "column",
            "layers.*.mlp.up_proj": "column",
            "layers.*.mlp.down_proj": "row",
            "lm_head": "column",
        },
        "sharded_rng": ("layers.*.attn", "layers.*.cross_attn"),
        "head_split": ("encoder_pos_bias", "decoder_pos_bias"),
    }
    # The parts besides blocks that a pipeline stage may go without (``parallel/pipeline.py``).
    STAGE_PARTS = ("embed", "pos_embed", "encoder_pos_bias", "decoder_pos_bias", "encoder_norm", "final_norm",
                   "lm_head")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.num_encoder_layers = cfg.num_layers
        self.embed = nn.Embedding(cfg.padded_vocab_size, h)  # shared by encoder, decoder (and a tied head)
        self.pos_embed: nn.Module | None = None
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, h)
        elif cfg.position == "sinusoidal":
            self.pos_embed = SinusoidalPositions(h)
        self.encoder_pos_bias = self.decoder_pos_bias = None
        if cfg.position == "relative":
            buckets, distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            self.encoder_pos_bias = RelativePositionBias(cfg.num_heads, buckets, distance, bidirectional=True)
            self.decoder_pos_bias = RelativePositionBias(cfg.num_heads, buckets, distance, bidirectional=False)
        self.dropout = nn.Dropout(cfg.embedding_dropout)
        n_enc, n_dec = cfg.num_layers, cfg.decoder_layers
        blocks: dict[str, nn.Module] = {str(i): EncoderBlock(cfg) for i in range(n_enc)}
        blocks.update({str(i): DecoderBlock(cfg) for i in range(n_enc, n_enc + n_dec)})
        self.layers = nn.ModuleDict(blocks)
        pre = cfg.norm_position == "pre"  # post-norm blocks already end in a norm
        self.encoder_norm = make_norm(cfg.norm, h, cfg.norm_eps, cfg.bias) if pre else None
        self.final_norm = make_norm(cfg.norm, h, cfg.norm_eps, cfg.bias) if pre else None
        self.lm_head = nn.Linear(h, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        return [b for k, b in self.layers.items() if int(k) < self.num_encoder_layers]

    @property
    def decoder_blocks(self) -> list[nn.Module]:
        return [b for k, b in self.layers.items() if int(k) >= self.num_encoder_layers]

    # ------------------------------------------------------------------------------------------------------------------

    def embed_tokens(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Either stack's input: token embeddings (scaled where configured), positions from ``start``, dropout."""
        x = self.embed(ids)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.hidden_size)
        if self.pos_embed is not None:
            positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape)
            x = x + self.pos_embed(positions).to(x.dtype)
        return self.dropout(x)

    # The pieces ``encode`` and ``decode`` are made of, so that a caller (a pipeline stage) can run a slice of the
    # blocks: each stack's masks and relative bias, the encoder's final norm, and the head.

    def encoder_context(self, s: int, padding_mask: torch.Tensor | None,
                        device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(self-attention mask, relative bias) of the encoder's blocks for sources of length ``s``."""
        mask = None if padding_mask is None else padding_mask.bool()[:, None, None, :]
        bias = None
        if self.encoder_pos_bias is not None:
            positions = torch.arange(s, device=device)
            bias = self.encoder_pos_bias(positions, positions)
        return mask, bias

    def decoder_context(
        self, t: int, padding_mask: torch.Tensor | None, decoder_padding_mask: torch.Tensor | None,
        device: torch.device, start: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(self-attention mask, cross-attention mask, relative bias) of the decoder's blocks for ``t`` positions
        after ``start`` cached ones; ``padding_mask`` is the encoder's."""
        mask = None
        if decoder_padding_mask is not None:
            mask = build_attention_mask(t, padding_mask=decoder_padding_mask)
        memory_mask = None if padding_mask is None else padding_mask.bool()[:, None, None, :]
        bias = None
        if self.decoder_pos_bias is not None:
            keys = torch.arange(start + t, device=device)
            bias = self.decoder_pos_bias(keys[start:], keys)
        return mask, memory_mask, bias

    def finish_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output from its last block's: the final norm of a pre-norm stack."""
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the decoder's last block's output."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.cfg.scale_decoder_output:  # the original T5, whose head is the (tied) embedding
            x = x * self.cfg.hidden_size**-0.5
        return self.lm_head(x)

    def encode(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output [b, s, h] for source ids [b, s]; ``padding_mask`` (True = real token)."""
        x = self.embed_tokens(input_ids)
        mask, bias = self.encoder_context(input_ids.shape[1], padding_mask, input_ids.device)
        for block in self.encoder_blocks:
            x = block(x, mask, bias)
        return self.finish_encoder(x)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        decoder_padding_mask: torch.Tensor | None = None,
        cache: list[tuple[KVCache, KVCache]] | None = None,
    ) -> torch.Tensor:
        """Logits [b, t, padded_vocab] for decoder inputs [b, t] attending to the encoder's output ``memory``.

        ``padding_mask`` is the encoder's; ``cache`` (per decoder layer: self- and cross-attention) holds what earlier
        generation steps computed, and ``decoder_input_ids`` are then the positions after it.
        """
        start = cache[0][0].length if cache else 0
        x = self.embed_tokens(decoder_input_ids, start)
        mask, memory_mask, bias = self.decoder_context(decoder_input_ids.shape[1], padding_mask,
                                                       decoder_padding_mask, x.device, start)
        for i, block in enumerate(self.decoder_blocks):
            x = block(x, memory, mask, memory_mask, bias, None if cache is None else cache[i])
        return self.head(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        decoder_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits [b, t, padded_vocab] for source ids [b, s] and decoder inputs [b, t]."""
        memory = self.encode(input_ids, padding_mask)
        return self.decode(decoder_input_ids, memory, padding_mask, decoder_padding_mask)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, padding_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy outputs [b, n <= max_new_tokens] for source ids [b, s] (right-padded, ``padding_mask``).

        The encoder runs once; each decoder step feeds only the newest token, with earlier self-attention keys and
        values and the projected encoder output cached. A row that has produced ``eos_token_id`` keeps repeating it;
        generation stops early when every row has.
        """
        was_training = self.training
        self.eval()
        memory = self.encode(input_ids, padding_mask)
        cache = [(KVCache(), KVCache(static=True)) for _ in self.decoder_blocks]
        b = input_ids.shape[0]
        step = input_ids.new_full((b, 1), self.cfg.decoder_start_token_id)
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = []
        for _ in range(max_new_tokens):
            logits = self.decode(step, memory, padding_mask, cache=cache)[:, -1, : self.cfg.vocab_size]
            step = logits.argmax(-1, keepdim=True)
            if eos_token_id is not None:
                step = step.masked_fill(done[:, None], eos_token_id)
                done |= step[:, 0] == eos_token_id
            out.append(step)
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return torch.cat(out, dim=1) if out else input_ids.new_zeros((b, 0))

    # ------------------------------------------------------------------------------------------------------------------

    def init_rules(self) -> dict[str, InitRule]:
        """The initial value of every parameter, by name. Norm scales 1, biases 0.

        T5 style (relative positions): the Mesh-TensorFlow scheme, which stands in for the missing 1/sqrt(d) on the
        logits: embedding std 1, queries (h * d_kv)^-0.5, keys, values, MLP inputs and bias tables h^-0.5, the
        attention output (heads * d_kv)^-0.5, the MLP output ffn^-0.5, an untied head h^-0.5 (unit-scale logits).
        Otherwise Normal(0, init_std), with embeddings h^-0.5 when they are scaled by sqrt(h) (unit scale after it).
        """
        cfg = self.cfg
        h, inner, ffn = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.ffn_size
        t5 = cfg.position == "relative"
        embed_std = 1.0 if t5 else (h**-0.5 if cfg.scale_embeddings else cfg.init_std)
        by_leaf = {"q_proj": (h * cfg.head_dim) ** -0.5, "k_proj": h**-0.5, "v_proj": h**-0.5, "o_proj": inner**-0.5,
                   "up_proj": h**-0.5, "gate_proj": h**-0.5, "down_proj": ffn**-0.5, "lm_head": h**-0.5}
        rules: dict[str, InitRule] = {}
        for mod_name, module in self.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            leaf = mod_name.rsplit(".", 1)[-1]
            for p_name, _ in module.named_parameters(recurse=False):
                if p_name == "bias":
                    rule = InitRule("zeros")
                elif isinstance(module, NORM_TYPES):
                    rule = InitRule("ones")
                elif module is self.embed:
                    rule = InitRule("normal", embed_std)
                elif isinstance(module, RelativePositionBias):
                    rule = InitRule("normal", h**-0.5)
                elif t5:
                    rule = InitRule("normal", by_leaf[leaf])
                else:
                    rule = InitRule("normal", cfg.init_std)
                rules.setdefault(prefix + p_name, rule)
        return {name: rules[name] for name, _ in self.named_parameters()}  # a tied matrix under its first name

    # ------------------------------------------------------------------------------------------------------------------
    # Pipeline stages: which parts a run of blocks uses, and what a stage runs (``parallel/pipeline.py`` asks)

    def stage_parts(self, layers: range, first: bool, last: bool) -> set[str]:
        """The parts besides blocks a stage running ``layers`` uses: the embedding where it embeds the encoder's or
        the decoder's input, each stack's bias table where it runs that stack's blocks, the encoder's final norm
        where the encoder ends, the head on the last stage."""
        e = self.num_encoder_layers
        parts = set()
        if first or e in layers:
            parts |= {"embed", "pos_embed"}
        if layers.start < e:
            parts.add("encoder_pos_bias")
        if layers.stop > e:
            parts.add("decoder_pos_bias")
        if layers.start < e <= layers.stop:
            parts.add("encoder_norm")
        if last:
            parts |= {"final_norm", "lm_head"}
        return parts

    def stage_costs(self) -> tuple[list[int], int, int]:
        """Parameters of each block (the decoder's first counting the embedding copy its stage holds), of the first
        stage's parts and of the last stage's, for balancing stages."""
        embeddings = child_numel(self, ("embed", "pos_embed"))
        blocks = [sum(p.numel() for p in block.parameters()) for block in self.layers.values()]
        blocks[self.num_encoder_layers] += embeddings
        return blocks, embeddings, child_numel(self, ("final_norm", "lm_head"))

    def as_stage(self, layers: range) -> nn.Module:
        """What a pipeline stage holding ``layers`` of this model runs (``EncoderDecoderStage``)."""
        return EncoderDecoderStage(self, layers)

    def stage_boundary(self, block: int, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                       **_inputs) -> tuple[tuple[int, ...], ...]:
        """Shapes of what passes into block ``block`` for one microbatch (source ``input_ids`` [b, s], target
        ``decoder_input_ids`` [b, t]), as ``EncoderDecoderStage`` sends it: encoder hidden states up to the encoder's
        end, then (decoder hidden states, encoder output); after the last block, the logits."""
        (b, s), t, d = input_ids.shape, decoder_input_ids.shape[1], self.cfg.hidden_size
        if block <= self.num_encoder_layers:
            return ((b, s, d),)
        if block == self.num_encoder_layers + self.cfg.decoder_layers:
            return ((b, t, self.cfg.padded_vocab_size),)
        return ((b, t, d), (b, s, d))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied matrix counts once); ``exclude_embeddings`` drops the token and learned
        position tables."""
        return distinct_numel(self, (self.embed, self.pos_embed) if exclude_embeddings else ())


class EncoderDecoderStage(nn.Module):
    """Blocks ``layers`` of an encoder-decoder (a view holding only them and the parts they use), fed what the stage
    before sent: encoder blocks run first, then decoder blocks, one stage possibly ending one stack and starting the
    other.

    Inputs by position: source ids (the first stage), encoder hidden states (an encoder stage), or
    ``(decoder hidden states, encoder output)`` (a decoder stage; a stage starting at the first decoder block gets
    the encoder output alone). Outputs: the next stage's inputs, or the logits on the last stage. Every stage that
    runs a stack's blocks computes that stack's relative bias from its own copy of the table.
    """

    def __init__(self, model: EncoderDecoderLM, layers: range) -> None:
        super().__init__()
        self.model = model
        self.start, self.stop = layers.start, layers.stop
        self.encoder_layers = model.num_encoder_layers
        self.last = layers.stop == model.num_encoder_layers + model.cfg.decoder_layers

    def forward(self, *acts: torch.Tensor, decoder_input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                decoder_padding_mask: torch.Tensor | None = None):
        m, e = self.model, self.encoder_layers
        x, memory = acts[0], (acts[1] if len(acts) > 1 else None)
        if self.start < e:
            if self.start == 0:
                x = m.embed_tokens(x)
            mask, bias = m.encoder_context(x.shape[1], padding_mask, x.device)
            for i in range(self.start, min(self.stop, e)):
                x = m.layers[str(i)](x, mask, bias)
            if self.stop < e:
                return x
            memory = m.finish_encoder(x)
            if self.stop == e:
                return memory
        elif self.start == e:
            memory = x
        if self.start <= e:
            x = m.embed_tokens(decoder_input_ids)
        mask, memory_mask, bias = m.decoder_context(decoder_input_ids.shape[1], padding_mask, decoder_padding_mask,
                                                    x.device)
        for i in range(max(self.start, e), self.stop):
            x = m.layers[str(i)](x, memory, mask, memory_mask, bias)
        if self.last:
            return m.head(x)
        # A received encoder output goes on as a new tensor, not the input itself or a view of it: the schedules
        # free a stage's outputs after its backward by detaching them in place.
        return x, (memory if memory.grad_fn is not None else memory.clone())


def build_encoder_decoder(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> EncoderDecoderLM:
    """The whole model for ``cfg`` on ``device``, initialized by name from ``seed`` (``init.build_initialized``)."""
    return build_initialized(EncoderDecoderLM, "encoder_decoder", cfg, device, seed)
