"""Global batches cut into data-parallel shares and microbatches, with background prefetch.

Global step ``s`` covers samples ``[c, c + G)`` where ``c`` is the number of samples consumed before it. Rank ``r`` of
``dp`` takes the contiguous slice ``[c + r*G/dp, c + (r+1)*G/dp)`` and splits it into microbatches in order. The only
state is ``consumed_samples``, so a run resumes at the same global sample on any data-parallel size.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from megatron_lite.config import microbatches_per_rank
from megatron_lite.constants import IGNORE_INDEX

from .errors import DataError

_END = object()


class GlobalBatchLoader:
    """Iterate this rank's microbatches, one list per global step; see the module docstring for the layout."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, prefetch: int = 2, pin_memory: bool = False) -> None:
        if min(global_batch_size, micro_batch_size, dp_size) < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"global batch {global_batch_size}, micro batch {micro_batch_size}, dp rank {dp_rank} of "
                            f"{dp_size}: expected positive sizes and 0 <= rank < dp size")
        microbatches_per_rank(global_batch_size, micro_batch_size, dp_size, "global batch size")
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.prefetch, self.pin_memory = max(0, int(prefetch)), pin_memory
        self._consumed = int(consumed_samples)

    @property
    def consumed_samples(self) -> int:
        """Global samples handed out so far (all ranks together)."""
        return self._consumed

    def state_dict(self) -> dict:
        return {"consumed_samples": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; a running iterator is abandoned, the next ``iter()`` starts there."""
        self._consumed = int(state["consumed_samples"])

    def __len__(self) -> int:
        """Global steps left before the dataset runs out."""
        return max(0, (len(self.dataset) - self._consumed) // self.global_batch_size)

    def _batch(self, start: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.global_batch_size // self.dp_size
        first = start + self.dp_rank * per_rank
        out = []
        for m in range(first, first + per_rank, self.micro_batch_size):
            items = [self.dataset[i] for i in range(m, m + self.micro_batch_size)]
            if "tokens" not in items[0]:  # samples that already hold inputs and labels (encoder-decoder objectives)
                mb = {k: torch.from_numpy(np.stack([x[k] for x in items])) for k in items[0]}
                out.append({k: v.contiguous().pin_memory() for k, v in mb.items()} if self.pin_memory else mb)
                continue
            tokens = torch.from_numpy(np.stack([x["tokens"] for x in items]))
            mb = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
            if "padding_mask" in items[0]:  # padded samples: no loss on padding, no attention to it
                real = torch.from_numpy(np.stack([x["padding_mask"] for x in items]))
                mb["labels"] = mb["labels"].masked_fill(~real[:, 1:], IGNORE_INDEX)
                mb["padding_mask"] = real[:, :-1]
            for key in ("position_ids", "document_ids"):
                if key in items[0]:
                    mb[key] = torch.from_numpy(np.stack([x[key] for x in items]))
            if self.pin_memory:
                mb = {k: v.contiguous().pin_memory() for k, v in mb.items()}
            out.append(mb)
        return out

    def _starts(self, start: int) -> Iterator[int]:
        s = start
        while s + self.global_batch_size <= len(self.dataset):
            yield s
            s += self.global_batch_size

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        start = self._consumed
        if self.prefetch == 0:
            for s in self._starts(start):
                batch = self._batch(s)
                self._consumed = s + self.global_batch_size
                yield batch
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for s in self._starts(start):
                    item = (s, self._batch(s))
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_END)
            except BaseException as e:  # hand the error to the consumer
                q.put(e)

        thread = threading.Thread(target=work, name="megatron-lite-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                s, batch = item
                self._consumed = s + self.global_batch_size
                yield batch
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)
