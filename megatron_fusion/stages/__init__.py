"""Training stages: each is "a loss and its extra inputs" inside the one trainer loop.

The contract (every member, with its default) is ``stages.base.Stage``; the stages register
themselves by name (``@register``), and ``build_stage`` builds the one ``cfg.stage`` names:
``sft`` (CE), ``fuse`` (CE + ULD + GLD against teachers, methods.md §4) and ``fpo`` (InfiFPO,
methods.md §5).
"""

from megatron_fusion.config import Config, ConfigError
from megatron_fusion.stages import fpo, fuse, sft  # noqa: F401  (each registers its stage)
from megatron_fusion.stages.base import STAGES, Stage, register
from megatron_fusion.stages.sft import SFTStage


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        raise ConfigError("stage", f"unknown stage {name!r} (known: {', '.join(sorted(STAGES))})")
    return STAGES[name]


def build_stage(cfg: Config, vocab_size: int, groups, dataset=None, tokenizer=None) -> Stage:
    """The stage ``cfg.stage`` names, built for this rank."""
    return stage_class(cfg.stage).build(cfg, vocab_size, groups, dataset, tokenizer)


__all__ = ["STAGES", "Stage", "SFTStage", "build_stage", "register", "stage_class"]
