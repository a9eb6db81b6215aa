"""Shared fixtures: demo data (synthetic tasks + tiny pivot tokenizer) made once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from megatron_fusion.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo_data"), n_train=200, n_valid=16)
