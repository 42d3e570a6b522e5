"""The model-parallel unit DeepSpeed asks for (``deepspeed.initialize(mpu=...)``), answered from the Topology."""

from __future__ import annotations

import torch.distributed as dist

from megatron_lite.topology import Topology


class TopologyMPU:
    """The model-parallel unit DeepSpeed asks for (``deepspeed.initialize(mpu=...)``), answered from the Topology.

    With it ZeRO reduces and partitions over the data axis only, and its gradient norm adds up the tensor-parallel
    shards (parameters marked ``tensor_model_parallel``) over the tensor axis, counting replicated ones once.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._model_group = topology.group("tp")
        if topology.pp > 1:  # the norm is summed over the stages too: one group per (dp, cp) coordinate
            mesh = topology.mesh.mesh
            for d in range(topology.dp):
                for c in range(topology.cp):
                    ranks = sorted(int(r) for r in mesh[:, d, c, :].flatten())
                    group = dist.new_group(ranks)  # every rank creates every group, in the same order
                    if topology.rank in ranks:
                        self._model_group = group

    def get_model_parallel_rank(self) -> int:
        return self.topology.tp_rank  # replicated parameters are counted on tensor rank 0 of every stage

    def get_model_parallel_world_size(self) -> int:
        return self.topology.tp * self.topology.pp

    def get_model_parallel_group(self):
        return self._model_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.topology.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.topology.tp

    def get_tensor_model_parallel_group(self):
        return self.topology.group("tp")

    # ZeRO's data axis is every rank holding the same weights: data-parallel x context-parallel.
    def get_data_parallel_rank(self) -> int:
        return self.topology.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topology.data_size

    def get_data_parallel_group(self):
        return self.topology.data_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.topology.data_group())

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.topology.pp

    def get_pipeline_model_parallel_group(self):
        return self.topology.group("pp")
