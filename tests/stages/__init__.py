"""Tests of megatron_fusion/stages."""
