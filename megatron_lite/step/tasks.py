"""Tasks: what a model family and objective make of a microbatch, apart from running the model.

A task names the model's inputs, the target, and the loss as a *sum* over valid tokens with their count. It never
calls the model: the shared step (``engines/base.py``) does, and so will a pipeline schedule, which needs
``loss(output, target)`` on the last stage alone. The decoder's causal-LM task is the first; the encoder-decoder's
task feeds the shifted labels to the decoder and keeps the same loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

from megatron_lite.config import Config
from megatron_lite.models.encoder_decoder import shift_right
from megatron_lite.parallel.cross_entropy import vocab_parallel_loss_sum
from megatron_lite.topology import Topology
from megatron_lite.step.loss import token_loss_sum, valid_tokens

Microbatch = dict[str, torch.Tensor]


class Task(ABC):
    """Inputs, target and summed loss for one kind of training."""

    @abstractmethod
    def inputs(self, mb: Microbatch) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward."""

    @abstractmethod
    def target(self, mb: Microbatch) -> torch.Tensor:
        """What ``loss`` compares the output with."""

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss over valid tokens, number of valid tokens) for one microbatch."""

    def num_tokens(self, target: torch.Tensor) -> torch.Tensor:
        """Valid tokens in ``target``, known before the forward: the step normalizes by their global total."""
        return valid_tokens(target)


class CausalLMTask(Task):
    """Next-token prediction for the decoder family; labels of -100 (padding) do not count.

    Label smoothing shapes the training target only: evaluation reports the plain cross-entropy, so that valid_ppl is
    a perplexity and runs with different smoothing compare. Logit columns past ``vocab_size`` (vocabulary padding)
    take no probability mass. With a tensor-parallel ``group`` the logits hold this rank's slice of the vocabulary,
    starting at ``vocab_start``, and the loss is the vocab-parallel one, which never gathers them.
    """

    def __init__(self, label_smoothing: float = 0.0, vocab_size: int | None = None, group=None,
                 vocab_start: int = 0) -> None:
        self.label_smoothing = label_smoothing
        self.vocab_size = vocab_size
        self.group, self.vocab_start = group, vocab_start

    def inputs(self, mb: Microbatch) -> dict[str, torch.Tensor]:
        """Token ids, and the positions of the whole sequence (given, or 0..s-1): a stage that receives hidden states
        split along the sequence (sequence parallelism under a pipeline) still sees every position."""
        ids = mb["input_ids"]
        positions = mb.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        keys = ("document_ids", "padding_mask")
        return {"input_ids": ids, "position_ids": positions, **{k: mb[k] for k in keys if k in mb}}

    def target(self, mb: Microbatch) -> torch.Tensor:
        return mb["labels"]

    def loss(self, output: torch.Tensor, target: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        smoothing = self.label_smoothing if training else 0.0
        if self.group is None:
            return token_loss_sum(output, target, smoothing, self.vocab_size)
        vocab = self.vocab_size if self.vocab_size is not None else output.shape[-1] * dist.get_world_size(self.group)
        return vocab_parallel_loss_sum(output, target, self.vocab_start, vocab, smoothing, self.group)


class Seq2SeqTask(CausalLMTask):
    """Encoder-decoder training (span corruption or seq2seq pairs): the decoder reads the labels shifted right behind
    ``start_token_id`` (teacher forcing), and the loss is the causal-LM one over real target tokens (labels other
    than -100), with the same smoothing, vocabulary padding and vocab-parallel handling."""

    def __init__(self, start_token_id: int, label_smoothing: float = 0.0, vocab_size: int | None = None,
                 group=None, vocab_start: int = 0) -> None:
        super().__init__(label_smoothing, vocab_size, group, vocab_start)
        self.start_token_id = start_token_id

    def inputs(self, mb: Microbatch) -> dict[str, torch.Tensor]:
        out = {"input_ids": mb["input_ids"], "decoder_input_ids": shift_right(mb["labels"], self.start_token_id)}
        if "padding_mask" in mb:
            out["padding_mask"] = mb["padding_mask"]
        return out


def seq2seq_task(cfg: Config, topology: Topology | None = None) -> Seq2SeqTask:
    """The encoder-decoder's task for ``cfg``; vocab-parallel when ``topology`` splits the model over a tensor axis."""
    start = cfg.model.decoder_start_token_id
    if topology is None or topology.tp == 1:
        return Seq2SeqTask(start, cfg.training.label_smoothing, cfg.model.vocab_size)
    first = topology.tp_rank * cfg.model.padded_vocab_size // topology.tp
    return Seq2SeqTask(start, cfg.training.label_smoothing, cfg.model.vocab_size, topology.group("tp"), first)


def causal_lm_task(cfg: Config, topology: Topology | None = None) -> CausalLMTask:
    """The decoder's task for ``cfg``; vocab-parallel when ``topology`` splits the model over a tensor axis."""
    if topology is None or topology.tp == 1:
        return CausalLMTask(cfg.training.label_smoothing, cfg.model.vocab_size)
    start = topology.tp_rank * cfg.model.padded_vocab_size // topology.tp
    return CausalLMTask(cfg.training.label_smoothing, cfg.model.vocab_size, topology.group("tp"), start)


def task_for(cfg: Config, topology: Topology | None = None) -> Task:
    """The task of ``cfg``'s model family: next-token prediction for a decoder, teacher-forced targets for an
    encoder-decoder; vocab-parallel when ``topology`` splits the model over a tensor axis."""
    return seq2seq_task(cfg, topology) if cfg.model.family == "encoder_decoder" else causal_lm_task(cfg, topology)
