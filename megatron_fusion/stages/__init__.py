"""Training stages: each is "a loss and its extra inputs" inside the one trainer loop.

A stage provides
- ``report_keys``: the (sum, count) metrics its loss reports, e.g. ``["loss/ce"]``;
- ``prepare_step(microbatches, groups)``: called once per optimizer step with this rank's
  micro-batches, before any forward (e.g. to all-reduce global term counts);
- ``loss_func(batch, output) -> (loss_sum, count, report)``: Megatron's per-token-loss contract.
  ``loss_sum`` is a scalar whose gradient is the stage's loss *times* the global normaliser;
  ``count`` is this micro-batch's share of that normaliser. Megatron sums ``count`` over
  micro-batches and DP ranks and divides the gradients by it once (``finalize_model_grads``),
  so gradient accumulation and DP size do not change the result.
  ``report`` maps each report key to a tensor ``[sum, count]``.
"""

from megatron_fusion.stages.sft import SFTStage

__all__ = ["SFTStage"]
