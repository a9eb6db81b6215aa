"""Tests of megatron_fusion/teachers."""
