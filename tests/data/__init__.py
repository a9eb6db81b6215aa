"""Tests of megatron_fusion/data."""
