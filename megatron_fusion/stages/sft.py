"""SFT stage: masked next-token cross entropy of the pivot (vocab-parallel, padding excluded)."""

from __future__ import annotations

import torch

from megatron_fusion.losses import token_logprobs
from megatron_fusion.stages.base import Stage, register

REPORT_CE = "loss/ce"


@register("sft")
class SFTStage(Stage):
    report_keys = [REPORT_CE]
    total_alias = REPORT_CE

    def __init__(self, vocab_size: int, tp_group):
        self.vocab_size = vocab_size
        self.tp_group = tp_group

    @classmethod
    def build(cls, cfg, vocab_size: int, groups, dataset, tokenizer) -> "SFTStage":
        return cls(vocab_size, groups.tp)

    def ce_sum(self, batch: dict, output: torch.Tensor):
        """Sum of masked token CE and the number of masked-in tokens of one micro-batch."""
        mask = batch["loss_mask"].float()                                      # [b, s]
        logp = token_logprobs(output, batch["labels"], vocab_size=self.vocab_size,
                              tp_group=self.tp_group)                          # [b, s] fp32
        return -(logp * mask).sum(), mask.sum()

    def loss_func(self, batch: dict, output: torch.Tensor):
        loss_sum, count = self.ce_sum(batch, output)
        report = {REPORT_CE: torch.stack([loss_sum.detach(), count])}
        return loss_sum, count.to(torch.int), report
