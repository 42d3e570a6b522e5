"""The decoder-only family: one implementation whose options cover GPT-2 and Llama styles.

The forward is a plain sequence, embed -> positions -> dropout -> blocks -> final norm -> lm_head, and each part is
skipped when it is None. A pipeline stage deletes the parts it does not own and feeds hidden states instead of ids; a
tensor-parallel plan shards the unfused ``nn.Linear`` modules by name. Neither needs changes here.

Blocks live in an ``nn.ModuleDict`` keyed by their global index ("0" .. "L-1"), so a stage that keeps layers 8-15
still calls them ``layers.8`` .. ``layers.15``: names, and so checkpoints, never depend on the layout. (The names are
the ones an ``nn.ModuleList`` gives, so checkpoints written with one load unchanged.) Activation checkpointing and
compilation are applied from outside (``megatron_lite/parallel/wrappers.py``), and initial values are described per
tensor (``init_rules``) and drawn by name (``models/init.py``), so that any layout starts from the same weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.moe import MoE
from megatron_lite.models.init import InitRule, build_initialized, child_numel, distinct_numel
from megatron_lite.models.layers import (
    MLP,
    NORM_TYPES,
    Attention,
    KVCache,
    SinusoidalPositions,
    build_attention_mask,
    make_norm,
    rotary_cos_sin,
)


def make_moe(cfg: ModelConfig) -> MoE:
    """The mixture-of-experts feed-forward layer ``cfg.moe`` describes."""
    m = cfg.moe
    return MoE(cfg.hidden_size, cfg.expert_ffn_size, m.num_experts, m.top_k, m.router, m.normalize_top_k,
               m.shared_experts, m.shared_expert_gate, m.aux_loss_coef, m.z_loss_coef)


class Block(nn.Module):
    """One transformer layer: attention then MLP (or a mixture of experts), each a residual branch, with pre- or
    post-norm."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.bias)
        self.attn = Attention(
            cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.bias, cfg.attention_dropout,
            qkv_bias=cfg.qkv_bias,
        )
        self.mlp_norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.bias)
        self.mlp = make_moe(cfg) if cfg.moe.is_moe_layer(index) else MLP(
            cfg.hidden_size, cfg.ffn_size, cfg.activation, cfg.bias)
        self.dropout = nn.Dropout(cfg.residual_dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:  # x + f(norm(x)): GPT-2, Llama
            x = x + self.dropout(self.attn(self.attn_norm(x), rope, mask, causal=True, cache=cache))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        # norm(x + f(x)): the original Transformer
        x = self.attn_norm(x + self.dropout(self.attn(x, rope, mask, causal=True, cache=cache)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class DecoderLM(nn.Module):
    """Causal language model: token ids [b, s] -> logits [b, s, padded_vocab_size]."""

    # How tensor parallelism splits this model, as data (``parallel/plans.py`` applies it): module name patterns ->
    # column / row / vocab / kv placements, and the modules that need more than a swap.
    TP_PLAN = {
        "layers": {
            "embed": "vocab",
            "layers.*.attn.q_proj": "column",
            "layers.*.attn.k_proj": "kv",
            "layers.*.attn.v_proj": "kv",
            "layers.*.attn.o_proj": "row",
            "layers.*.mlp.gate_proj": "column",
            "layers.*.mlp.up_proj": "column",
            "layers.*.mlp.down_proj": "row",
            "lm_head": "column",  # logits stay split over the vocabulary: the loss is vocab-parallel
        },
        "sharded_rng": ("layers.*.attn",),
        "sequence_params": ("layers.*.attn_norm", "layers.*.mlp_norm", "final_norm"),
        "sequence_dropout": ("dropout", "layers.*.dropout"),
        "sequence_split": ("pos_embed",),
    }
    # The parts besides blocks that a pipeline stage may go without (``parallel/pipeline.py``).
    STAGE_PARTS = ("embed", "pos_embed", "final_norm", "lm_head")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed = nn.Embedding(cfg.padded_vocab_size, h)
        if cfg.position == "learned":
            self.pos_embed: nn.Module | None = nn.Embedding(cfg.max_seq_len, h)
        elif cfg.position == "sinusoidal":
            self.pos_embed = SinusoidalPositions(h)  # no parameters; computed from position ids
        else:
            self.pos_embed = None  # rotary: applied to q and k inside attention
        self.dropout = nn.Dropout(cfg.embedding_dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        # Post-norm blocks already end in a norm, so only pre-norm needs a final one.
        self.final_norm = make_norm(cfg.norm, h, cfg.norm_eps, cfg.bias) if cfg.norm_position == "pre" else None
        self.lm_head = nn.Linear(h, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """``input_ids`` long [b, s], or float hidden states [b, s, h] when this module has no ``embed``.

        ``position_ids`` default to 0..s-1; hidden states may hold part of the sequence that the positions, document
        ids and padding mask describe whole. With ``document_ids`` a token attends only to earlier tokens of the same
        document; with ``padding_mask`` (True = real token) padded keys are never attended to. ``cache`` (one
        ``KVCache`` per layer, for generation) holds the keys and values of the positions before ``input_ids``.
        """
        b, s = input_ids.shape[:2]
        device = input_ids.device
        if position_ids is None:
            start = cache[0].length if cache else 0
            position_ids = torch.arange(start, start + s, device=device).expand(b, s)

        if self.embed is not None:
            x = self.embed(input_ids)
            if self.cfg.scale_embeddings:  # the original Transformer: keeps embeddings on the scale of the positions
                x = x * math.sqrt(self.cfg.hidden_size)
            if self.pos_embed is not None:
                x = x + self.pos_embed(position_ids).to(x.dtype)
            x = self.dropout(x)
        else:
            x = input_ids

        rope = None
        if self.cfg.position == "rotary":
            scaling = getattr(self.cfg, "rope_scaling", None)
            rope = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, scaling, dtype=x.dtype)
        mask = self.attention_mask(position_ids, document_ids, padding_mask, device)

        for i, block in enumerate(self.layers.values()):
            x = block(x, rope, mask) if cache is None else block(x, rope, mask, cache[i])

        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def attention_mask(self, position_ids: torch.Tensor, document_ids: torch.Tensor | None,
                       padding_mask: torch.Tensor | None, device: torch.device):
        """The mask every layer's attention takes (``build_attention_mask``; None: plain causal). A point to extend
        where each process holds part of the sequence and its queries meet the other parts' keys."""
        return build_attention_mask(position_ids.shape[1], document_ids, padding_mask, device=device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of the prompts ``input_ids`` [b, s] (one length, no padding): [b, s + new].

        The prompt runs once, then each step feeds only the last token, with the earlier keys and values cached. A row
        that has produced ``eos_token_id`` keeps repeating it; generation stops early when every row has.
        """
        was_training = self.training
        self.eval()
        cache = [KVCache() for _ in self.layers]
        out, step = input_ids, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step, cache=cache)[:, -1, : self.cfg.vocab_size]
            step = logits.argmax(-1, keepdim=True)
            if eos_token_id is not None:
                step = step.masked_fill(done[:, None], eos_token_id)
                done |= step[:, 0] == eos_token_id
            out = torch.cat((out, step), dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------------------------

    def init_rules(self) -> dict[str, InitRule]:
        """The initial value of every parameter, by name: Normal(0, init_std) for matrices and embeddings; residual
        output projections (o_proj, down_proj) use init_std / sqrt(2 * num_layers) when ``scaled_residual_init``, so
        the residual stream's variance does not grow with depth (GPT-2). Norm scales are 1, all biases 0."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers) if self.cfg.scaled_residual_init else std
        rules: dict[str, InitRule] = {}
        for mod_name, module in self.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for p_name, _ in module.named_parameters(recurse=False):
                if p_name == "bias":
                    rule = InitRule("zeros")
                elif isinstance(module, NORM_TYPES):
                    rule = InitRule("ones")
                elif mod_name.rsplit(".", 1)[-1] in ("o_proj", "down_proj"):
                    rule = InitRule("normal", out_std)
                else:
                    rule = InitRule("normal", std)
                rules.setdefault(prefix + p_name, rule)
        return {name: rules[name] for name, _ in self.named_parameters()}  # a tied matrix under its first name

    # ------------------------------------------------------------------------------------------------------------------
    # Pipeline stages: which parts a run of blocks uses, and what a stage runs (``parallel/pipeline.py`` asks)

    def stage_parts(self, layers: range, first: bool, last: bool) -> set[str]:
        """The parts besides blocks a stage running ``layers`` uses: the embeddings first, the head last."""
        return {*(("embed", "pos_embed") if first else ()), *(("final_norm", "lm_head") if last else ())}

    def stage_costs(self) -> tuple[list[int], int, int]:
        """Parameters of each block, of the first stage's parts and of the last stage's, for balancing stages."""
        blocks = [sum(p.numel() for p in block.parameters()) for block in self.layers.values()]
        return blocks, child_numel(self, ("embed", "pos_embed")), child_numel(self, ("final_norm", "lm_head"))

    def as_stage(self, layers: range) -> nn.Module:
        """What a pipeline stage holding ``layers`` of this model runs: the model itself, whose forward skips the
        parts it lacks and takes hidden states when it has no embedding."""
        return self

    def stage_boundary(self, block: int, input_ids: torch.Tensor, **_inputs) -> tuple[tuple[int, ...], ...]:
        """Shapes of what passes into block ``block`` for one microbatch of ``input_ids`` [b, s]: the hidden states;
        after the last block, the logits."""
        b, s = input_ids.shape
        return ((b, s, self.cfg.padded_vocab_size if block == self.cfg.num_layers else self.cfg.hidden_size),)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied matrix counts once). ``exclude_embeddings`` drops the token and learned
        position tables, the usual convention for FLOPs estimates; an untied lm_head stays, as it is a real matmul."""
        return distinct_numel(self, (self.embed, self.pos_embed) if exclude_embeddings else ())


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> DecoderLM:
    """The whole decoder for ``cfg`` on ``device``, initialized by name from ``seed`` (``init.build_initialized``)."""
    return build_initialized(DecoderLM, "decoder", cfg, device, seed)
