"""Tests of megatron_fusion/losses."""
