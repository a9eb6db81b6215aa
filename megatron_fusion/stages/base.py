"""The stage contract: what a training stage gives the one trainer loop, and the stage registry.

A stage is "a loss and its extra inputs". The trainer (``megatron_fusion.train``) calls, per run:

    stage = build_stage(cfg, vocab_size, groups, dataset, tokenizer)   # stages.STAGES[cfg.stage]
    stage.setup(model=..., groups=..., dp=..., resumed=..., forward_step=...)   # once, before step 1

and per optimizer step, with this DP rank's micro-batches (made by ``stage.collate``):

    stage.prepare_step(microbatches, groups)     # before any forward (global term counts, teachers)
    ... Megatron's schedule calls stage.loss_func(batch, output) per micro-batch ...
    stage.derive_metrics(metrics)                 # metrics derived from the reduced reports
    stage.step_metrics()                          # extra per-step metrics (e.g. teacher wait time)

Held-out evaluation: CE per ``data.valid`` file through ``stage.eval_stage()`` (a plain SFT
stage), plus ``stage.evaluate(model)`` for stages with metrics of their own (``has_evaluate``).

``loss_func(batch, output) -> (loss_sum, count, report)`` is Megatron's per-token-loss contract:
``loss_sum`` is a scalar whose gradient is the stage's loss *times* the global normaliser;
``count`` is this micro-batch's share of that normaliser. Megatron sums ``count`` over
micro-batches and DP ranks and divides the gradients by it once (``finalize_model_grads``), so
gradient accumulation and DP size do not change the result. ``report`` maps each of
``report_keys`` to a tensor ``[sum, count]`` (reduced once per step over the world).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from megatron_fusion.config import Config


class Stage:
    """Base class of every stage; each optional member has its default here."""

    #: the ``stage:`` name in configs; set by ``@register``
    name: ClassVar[str] = ""
    #: the (sum, count) metrics ``loss_func`` reports, e.g. ``["loss/ce"]``
    report_keys: list[str] = []
    #: the report key logged as ``loss/total`` when the stage reports no ``loss/total`` itself
    total_alias: ClassVar[str | None] = None
    #: sequences per sample (FPO: chosen + rejected); the pipeline's p2p shapes are per sequence
    sequences_per_sample: ClassVar[int] = 1
    #: whether ``evaluate`` adds held-out metrics of the stage's own
    has_evaluate: ClassVar[bool] = False
    #: the optimizer step being prepared (1-based); the trainer sets it before ``prepare_step``
    step: int = 0

    @classmethod
    def build_dataset(cls, cfg: Config, tokenizer):
        """The training set of this stage (default: SFT JSONL, ``data.train``)."""
        from megatron_fusion.data.build import build_sft_dataset

        return build_sft_dataset(cfg, cfg.data.train, tokenizer)

    @classmethod
    def build(cls, cfg: Config, vocab_size: int, groups, dataset, tokenizer) -> "Stage":
        raise NotImplementedError(f"stage {cls.name!r} does not define build()")

    def collate(self, items: list[dict]) -> dict:
        """Samples -> one micro-batch (default: SFT samples, ``data.order.collate``)."""
        from megatron_fusion.data.order import collate

        return collate(items)

    def setup(self, *, model, groups, dp: int, resumed: bool, forward_step: Callable) -> None:
        """Once, after the model is built and any checkpoint loaded (FPO: the reference pass)."""

    def prepare_step(self, microbatches: list[dict], groups) -> None:
        """Once per optimizer step, before any forward."""

    def loss_func(self, batch: dict, output: torch.Tensor):
        raise NotImplementedError(f"stage {self.name!r} does not define loss_func()")

    def eval_stage(self) -> "Stage":
        """The stage whose ``loss/ce`` is the held-out CE (default: this one)."""
        return self

    def evaluate(self, model) -> dict[str, Any]:
        """Held-out metrics of the stage's own (only called when ``has_evaluate``)."""
        return {}

    def step_metrics(self) -> dict[str, float]:
        """Extra metrics of the step just taken."""
        return {}

    def derive_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics from the reduced reports, with any the stage derives from them
        (e.g. norms from squared norms); default: unchanged."""
        return metrics


STAGES: dict[str, type[Stage]] = {}


def register(name: str):
    """Class decorator: make a ``Stage`` subclass buildable as ``stage: <name>``."""

    def deco(cls: type[Stage]) -> type[Stage]:
        if name in STAGES and STAGES[name] is not cls:
            raise ValueError(f"stage {name!r} registered twice ({STAGES[name].__name__}, {cls.__name__})")
        cls.name = name
        STAGES[name] = cls
        return cls

    return deco
