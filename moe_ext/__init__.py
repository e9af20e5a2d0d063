"""moe_ext: Mixture-of-Experts parallelism that works on PCIe-only GPU boxes.

Topology probe -> ParallelPlan -> process groups -> MoE layers whose token transport
(replication, TP sharding, all-gather, NCCL all-to-all, NVSHMEM) is picked by the plan.
"""

__version__ = "0.1.0"
