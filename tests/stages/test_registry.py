"""The stage contract (stages/base.py) and the registry the trainer builds stages from."""

from __future__ import annotations

import pytest
import torch

from megatron_fusion.config import ConfigError, load_config
from megatron_fusion.stages import STAGES, Stage, build_stage, register, stage_class
from megatron_fusion.stages.fpo import FPOStage
from megatron_fusion.stages.fuse import FuseStage
from megatron_fusion.stages.sft import SFTStage


def test_built_in_stages_are_registered_by_their_config_names():
    assert {k: STAGES[k] for k in ("sft", "fuse", "fpo")} == {
        "sft": SFTStage, "fuse": FuseStage, "fpo": FPOStage}
    assert all(STAGES[k].name == k for k in STAGES)
    # what the loop reads instead of probing with hasattr
    assert (SFTStage.sequences_per_sample, FuseStage.sequences_per_sample,
            FPOStage.sequences_per_sample) == (1, 1, 2)
    assert (SFTStage.has_evaluate, FuseStage.has_evaluate, FPOStage.has_evaluate) == (False, False, True)
    assert SFTStage.total_alias == "loss/ce" and FuseStage.total_alias is None


def test_unknown_stage_names_the_field_and_the_known_stages():
    with pytest.raises(ConfigError, match=r"stage: unknown stage 'distill' \(known: .*fpo.*fuse.*sft"):
        stage_class("distill")


def test_base_defaults_and_a_new_stage_through_the_registry():
    calls = []

    @register("test_only_stage")
    class Counting(Stage):
        report_keys = ["loss/x"]

        @classmethod
        def build(cls, cfg, vocab_size, groups, dataset, tokenizer):
            calls.append((cfg.stage, vocab_size, groups, dataset, tokenizer))
            return cls()

        def loss_func(self, batch, output):
            s = output.sum()
            return s, torch.tensor(1), {"loss/x": torch.stack([s.detach(), torch.tensor(1.0)])}

    try:
        cfg = load_config(None, ["stage=sft"])
        cfg.stage = "test_only_stage"          # past the config's Literal: the registry decides
        st = build_stage(cfg, 7, "groups", "ds", "tok")
        assert isinstance(st, Counting) and calls == [("test_only_stage", 7, "groups", "ds", "tok")]
        # every optional member has its default
        assert st.setup(model=None, groups=None, dp=1, resumed=False, forward_step=None) is None
        assert st.prepare_step([], None) is None
        assert st.eval_stage() is st and st.evaluate(None) == {} and st.step_metrics() == {}
        assert st.sequences_per_sample == 1 and not st.has_evaluate and st.total_alias is None
        batch = st.collate([{"tokens": torch.tensor([1, 2]), "labels": torch.tensor([2, 3]),
                             "loss_mask": torch.tensor([1, 1]), "sample_id": 5}])
        assert batch["tokens"].shape == (1, 2) and batch["sample_id"].tolist() == [5]
        assert batch["position_ids"].tolist() == [[0, 1]]
        with pytest.raises(ValueError, match="registered twice"):
            register("test_only_stage")(type("Other", (Stage,), {}))
    finally:
        STAGES.pop("test_only_stage", None)
