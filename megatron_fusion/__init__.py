"""megatron-fusion: fuse heterogeneous LLMs into a pivot model on Megatron-Core.

Stages: ``fuse`` (InfiFusion ULD + InfiGFusion GLD + CE) and ``fpo`` (InfiFPO).
The math lives in ``megatron_fusion.losses``; the trainer in ``megatron_fusion.train``.
"""

__version__ = "0.1.0"
