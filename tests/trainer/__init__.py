"""Tests of megatron_fusion/trainer."""
