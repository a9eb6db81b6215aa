"""Helpers shared by the tests (rank-side functions run through megatron_fusion.local_ranks)."""
