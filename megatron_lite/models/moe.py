"""Mixture-of-experts feed-forward layer: a router picks ``top_k`` SwiGLU experts per token, dropless.

Plain single-process PyTorch. The routed tokens are sorted by expert and handed to ``run_experts`` as one contiguous
run per expert; expert parallelism (``parallel/experts.py``) extends that one point to send each run to the rank that
holds the expert, and keeps only that rank's experts in ``experts`` (a ``ModuleDict`` keyed by the global expert
index, so names, and so checkpoints, never depend on the layout).

**Routing is dropless:** no capacity factor, every token reaches exactly its ``top_k`` experts, so a token's output is
the same however the batch is split over ranks and microbatches.

**Losses beside the language-model loss.** The balancing loss (Switch/GShard: ``E * sum_e f_e * P_e`` with ``f_e``
the share of a sequence's routed slots that chose expert ``e`` and ``P_e`` its mean router probability) is taken per
sequence, and the router z-loss (squared log-sum-exp of the logits) per token, so both are the same on every layout.
Each is added to the step's loss as a token sum (a sequence's balancing loss weighs as many tokens as it has), so the
shared step's one normalization (by the global batch's valid tokens) applies to them too. They join the gradient
where they arise, through ``AuxiliaryLoss``: the layer's output passes unchanged, and its backward gives the auxiliary
sum the gradient ``loss_scale`` (what the step multiplies its loss by), which also works inside a pipeline stage that
never sees the final loss.

**Expert compute.** A loop over the experts, each a plain SwiGLU ``MLP`` on its run of tokens (CPU, and wherever a
wrapper must see each expert's own forward, as FSDP2 does for experts that are their own units); on CUDA one
grouped matmul per projection over all experts (``torch._grouped_mm``, bf16 on compute capability 9.0 and newer),
the weights stacked for the call. ``grouped_experts`` chooses: None (the default) picks by device, True or False
forces one.

**Statistics** (tokens per expert, the two losses) are counted in that backward, once per microbatch however many
times activation recomputation runs the forward; the step reads and clears them (``take_statistics``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.models.layers import MLP


class AuxiliaryLoss(torch.autograd.Function):
    """Identity on ``out``; in backward, ``aux`` gets the gradient ``scale`` and the layer's statistics are counted."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, layer: "MoE", stats: torch.Tensor) -> torch.Tensor:
        ctx.layer, ctx.stats = layer, stats
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        layer.count(ctx.stats)
        scale = torch.full((), layer.loss_scale, dtype=torch.float32, device=grad.device)
        return grad, scale, None, None


class MoE(nn.Module):
    """Routed SwiGLU experts, with optional always-on shared experts: [..., h] -> [..., h]."""

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int, router: str = "softmax",
                 normalize_top_k: bool = True, shared_experts: int = 0, shared_expert_gate: bool = False,
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.kind = num_experts, top_k, router
        self.normalize_top_k = normalize_top_k
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleDict({str(e): MLP(hidden_size, ffn_size, "swiglu", False) for e in range(num_experts)})
        self.shared = MLP(hidden_size, shared_experts * ffn_size, "swiglu", False) if shared_experts else None
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        # DeepSeek-V3's balancing bias: chooses experts, never weighs them; moved outside the gradient (update_bias)
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self.loss_scale = 1.0  # the gradient of the auxiliary sum: what the step scales its loss by
        self.grouped_experts: bool | None = None  # None: grouped matmuls on CUDA where torch has them, else a loop
        # True only to trace with fake tensors (a dry run), which have no values to count: the routed tokens are
        # taken as spread evenly over the experts
        self.assume_even_load = False
        self._stats: torch.Tensor | None = None  # [E + 3]: tokens per expert, balancing sum, z sum, tokens routed

    def init_buffers(self) -> None:
        """Initial buffer values once the model is given storage (the bias starts at zero)."""
        self.expert_bias.zero_()

    # ------------------------------------------------------------------------------------------------------------------

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities [T, E] for the balancing loss, chosen experts [T, k], their weights [T, k]) from fp32
        router logits [T, E]."""
        if self.kind == "softmax":
            probs = logits.softmax(-1)
            chosen = probs.topk(self.top_k, dim=-1).indices
            weights = probs.gather(-1, chosen)
        else:
            scores = logits.sigmoid()
            chosen = (scores + self.expert_bias.to(scores.dtype)).topk(self.top_k, dim=-1).indices
            weights = scores.gather(-1, chosen)
            probs = scores / scores.sum(-1, keepdim=True)
        if self.normalize_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, chosen, weights

    def run_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert of ``experts`` (in order) applied to its run of ``tokens`` [n, h], sorted by expert with
        ``counts[e]`` rows for the e-th; the outputs in the same order. A point to extend where the experts are
        spread over processes."""
        if self._grouped(tokens):
            return self._grouped_experts(tokens, counts)
        parts = tokens.split(self.run_lengths(counts, tokens.shape[0], len(self.experts)))
        return torch.cat([expert(part) for expert, part in zip(self.experts.values(), parts)])

    def run_lengths(self, counts: torch.Tensor, rows: int, runs: int) -> list[int]:
        """``counts`` as Python integers; under ``assume_even_load``, ``rows`` split as evenly as can be into ``runs``."""
        if self.assume_even_load:
            return [rows // runs + (i < rows % runs) for i in range(runs)]
        return counts.tolist()

    def _grouped(self, tokens: torch.Tensor) -> bool:
        if self.grouped_experts is not None:
            return self.grouped_experts
        return (tokens.is_cuda and hasattr(torch, "_grouped_mm")
                and torch.cuda.get_device_capability(tokens.device) >= (9, 0))

    def _grouped_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``run_experts`` as three grouped matmuls: rows ``[offs[e-1], offs[e])`` of the tokens meet expert e's
        weights, stacked [E, in, out]. Under autocast in the autocast dtype (the grouped kernel takes bf16 on CUDA)."""
        experts = list(self.experts.values())
        device = tokens.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tokens.dtype
        offs = counts.cumsum(0).to(torch.int32)

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([getattr(e, name).weight for e in experts]).transpose(1, 2).to(dtype)

        x = tokens.to(dtype)
        with torch.autocast(device, enabled=False):
            gate = torch._grouped_mm(x, stacked("gate_proj"), offs=offs)
            up = torch._grouped_mm(x, stacked("up_proj"), offs=offs)
            return torch._grouped_mm(F.silu(gate) * up, stacked("down_proj"), offs=offs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat).float()
        probs, chosen, weights = self.route(logits)
        slots = chosen.reshape(-1)  # [T * k]: the expert of each (token, choice)
        order = slots.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=slots.device).scatter_add_(
            0, slots, torch.ones_like(slots))  # a bincount of fixed size, which fake tensors can trace
        routed = self.run_experts(flat[token_of], counts)
        routed = routed * weights.reshape(-1)[order, None].to(routed.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of, routed.to(flat.dtype))
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        out = out.view(shape)
        if not (torch.is_grad_enabled() and out.requires_grad):
            return out
        balance, z = self._losses(logits, probs, chosen, shape[-2] if len(shape) > 2 else 1)
        aux = self.aux_loss_coef * balance + self.z_loss_coef * z
        stats = torch.cat((counts.double(), torch.stack((balance.detach(), z.detach())).double(),
                           torch.full((1,), float(flat.shape[0]), dtype=torch.float64, device=flat.device)))
        return AuxiliaryLoss.apply(out, aux, self, stats)

    def _losses(self, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
                seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(balancing loss, z-loss), each summed over tokens: a sequence's balancing loss counts as many times as it
        has tokens here (``seq_len``; all of its tokens together, where the sequence is split over processes)."""
        e = self.num_experts
        picked = F.one_hot(chosen.view(-1, seq_len * self.top_k), e).sum(1).to(probs.dtype)  # [b, E]
        prob_sums = probs.view(-1, seq_len, e).sum(1)  # [b, E]
        picked, prob_sums, whole = self.sequence_totals(picked, prob_sums, seq_len)
        share, mean_probs = picked / (whole * self.top_k), prob_sums / whole
        balance = (e * (share * mean_probs).sum(-1)).sum() * seq_len
        z = torch.logsumexp(logits, dim=-1).square().sum()
        return balance, z

    def sequence_totals(self, picked: torch.Tensor, prob_sums: torch.Tensor,
                        seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Each sequence's expert choices and router probabilities [b, E] summed over its tokens, and its length: over
        the tokens given. A point to extend where each process holds part of every sequence (the sums' gradients
        then reach every part)."""
        return picked, prob_sums, seq_len

    # ------------------------------------------------------------------------------------------------------------------

    def count(self, stats: torch.Tensor) -> None:
        self._stats = stats.clone() if self._stats is None else self._stats + stats

    def take_statistics(self) -> torch.Tensor:
        """[tokens per expert..., balancing-loss sum, z-loss sum, tokens routed] counted since the last call (zeros
        if none)."""
        stats = self._stats
        self._stats = None
        if stats is None:
            return torch.zeros(self.num_experts + 3, dtype=torch.float64, device=self.expert_bias.device)
        return stats

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of experts below the mean load by ``rate``,
        lower the others'. ``load`` is the step's tokens per expert over the whole global batch, so every rank that
        holds this layer moves it alike."""
        if rate:
            self.expert_bias += rate * torch.sign(load.mean() - load).to(self.expert_bias)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, router={self.kind}"


def moe_layers(model: nn.Module) -> dict[int, MoE]:
    """The mixture layers of ``model`` (or of the stages it holds) by block index."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            parts = name.split(".")
            out[int(parts[parts.index("layers") + 1])] = module
    return out


_EXPERT_NAME = re.compile(r"(^|\.)experts\.\d+\.")


def is_expert_param(name: str) -> bool:
    """Whether parameter ``name`` belongs to a routed expert (``layers.3.mlp.experts.5.up_proj.weight``): the
    weights expert parallelism splits, and whose gradients only the ranks holding that expert reduce."""
    return bool(_EXPERT_NAME.search(name))


_MIXTURE_NAME = re.compile(r"(^|\.)mlp\.(router|experts|shared|shared_gate)\.")


def is_mixture_param(name: str) -> bool:
    """Whether parameter ``name`` belongs to a mixture layer (router, experts, shared experts): tensor parallelism
    leaves these whole (``DecoderLM.TP_PLAN`` names only the dense MLP's projections)."""
    return bool(_MIXTURE_NAME.search(name))
