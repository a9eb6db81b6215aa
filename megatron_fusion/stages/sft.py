"""SFT stage: masked next-token cross entropy of the pivot (Megatron's vocab-parallel CE)."""

from __future__ import annotations

import torch

REPORT_CE = "loss/ce"


def vocab_parallel_ce(logits_local: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                      tp_rank: int) -> torch.Tensor:
    """Per-token CE ``[b, s]`` from batch-first vocab-sharded logits ``[b, s, v_local]``.

    Megatron pads the vocabulary to a multiple of tp*128; padded columns are set to -inf here
    so they take no probability mass (only on the shard that holds padding).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    v_local = logits_local.shape[-1]
    start = tp_rank * v_local
    n_pad = start + v_local - vocab_size
    if n_pad > 0:
        col = torch.arange(start, start + v_local, device=logits_local.device)
        logits_local = logits_local.masked_fill(col >= vocab_size, float("-inf"))
    # megatron-core wants [s, b, v/tp] and [s, b]
    loss = vocab_parallel_cross_entropy(logits_local.transpose(0, 1).contiguous().float(),
                                        labels.transpose(0, 1).contiguous())
    return loss.transpose(0, 1)


class SFTStage:
    report_keys = [REPORT_CE]

    def __init__(self, vocab_size: int, tp_rank: int):
        self.vocab_size = vocab_size
        self.tp_rank = tp_rank

    def prepare_step(self, microbatches, groups) -> None:
        return None

    def loss_func(self, batch: dict, output: torch.Tensor):
        mask = batch["loss_mask"].float()
        ce = vocab_parallel_ce(output, batch["labels"], self.vocab_size, self.tp_rank)
        loss_sum = (ce * mask).sum()
        count = mask.sum()
        report = {REPORT_CE: torch.stack([loss_sum.detach(), count])}
        return loss_sum, count.to(torch.int), report
