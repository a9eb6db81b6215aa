"""The data order of a run: which samples make each micro-batch of each step on each DP rank.

The data position of a run is one integer, the number of samples consumed; ``SampleOrder`` maps
global sample numbers to dataset indices (a seeded permutation per epoch), and
``step_microbatch_indices`` cuts one optimizer step into this DP rank's micro-batches. Resume
needs nothing else, and online teachers walk the same order from the same position.
"""

from __future__ import annotations

import torch

from megatron_fusion.config import Config, ConfigError
from megatron_fusion.data.packing import collate_unpacked_metrics, pack_step
from megatron_fusion.errors import DataError
from megatron_fusion.parallel import to_device


class SampleOrder:
    """Deterministic sample order: a fresh seeded permutation per epoch.

    ``indices(start, n)`` gives dataset indices of global samples start..start+n-1, so the data
    position of a run is one integer (consumed samples) and resume needs nothing else.
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise DataError("data: the training set is empty")
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, n: int) -> list[int]:
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(start, start + n)]


def collate(items: list[dict]) -> dict:
    """Samples -> one unpacked micro-batch, one padded row per sample."""
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if torch.is_tensor(items[0][k])}
    out["sample_id"] = torch.tensor([int(it["sample_id"]) for it in items])
    b, s = out["tokens"].shape
    out["position_ids"] = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    out.update(collate_unpacked_metrics(items, s))
    return out


def step_microbatch_indices(order: SampleOrder, consumed: int, global_batch: int, micro_batch: int,
                            dp: int, dp_rank: int) -> list[list[int]]:
    """Dataset indices of each micro-batch of DP rank ``dp_rank`` in the optimizer step that starts
    at global sample ``consumed``: the rank takes global samples ``consumed + dp_rank * gb/dp`` ..
    ``+ gb/dp - 1`` in order, cut into micro-batches of ``micro_batch``. The ONE step slicing of
    the project: the student's loop and the online teachers' loop both use it, so a teacher always
    computes exactly the micro-batches the student trains on (the fingerprint checks it)."""
    per_rank = global_batch // dp
    idx = order.indices(consumed + dp_rank * per_rank, per_rank)
    return [idx[j:j + micro_batch] for j in range(0, per_rank, micro_batch)]


def rank_microbatches(dataset, order: SampleOrder, consumed: int, cfg: Config, dp: int,
                      dp_rank: int, collate_fn=collate, device: torch.device | None = None
                      ) -> list[dict]:
    """This DP rank's micro-batches of the optimizer step that starts at ``consumed``.

    ``collate_fn`` builds host tensors; with ``device`` each micro-batch is moved there once
    (``parallel.to_device``; ``sample_id`` stays on the host: it is metadata, never a kernel input).
    With ``data.packing: greedy`` the step's samples are packed instead (``data.packing``,
    docs/methods.md §10): rows of ``model.seq_length`` slots, ``train.micro_batch`` rows per
    micro-batch, so a step has as many micro-batches as its samples need.
    """
    idx = step_microbatch_indices(order, consumed, cfg.train.global_batch, cfg.train.micro_batch,
                                  dp, dp_rank)
    if cfg.data.packing == "greedy":
        check_packing(cfg)
        items = [dataset[i] for m in idx for i in m]
        seqs = 2 if items and "chosen_tokens" in items[0] else 1     # preference pairs: 2 rows
        micro = pack_step(items, seq_len=cfg.model.seq_length,
                          rows_per_micro=cfg.train.micro_batch * seqs, pad_id=dataset.pad_id)
    else:
        micro = [collate_fn([dataset[i] for i in m]) for m in idx]
    return micro if device is None else [to_device(m, device) for m in micro]


def check_packing(cfg: Config) -> None:
    """What packing does not cover yet fails naming the field (before the first forward)."""
    if cfg.parallel.vpp is not None:
        raise ConfigError("data.packing", "'greedy' gives a varying number of micro-batches per "
                          "step, which the interleaved schedule (parallel.vpp) cannot take; set "
                          "data.packing=none or unset parallel.vpp")


def packing_efficiency(dataset, order: SampleOrder, cfg: Config, dp: int, collate_fn=collate,
                       steps: int = 20) -> dict[str, float]:
    """Real tokens / sequence slots of the run's first ``steps`` optimizer steps (every DP
    rank), packed as ``cfg.data.packing`` says and unpadded-vs-padded: the data stats line a
    packed run prints at start (the steps' exact values are logged as
    ``data/packing_efficiency``)."""
    from dataclasses import replace

    out = {}
    for mode in ("none", cfg.data.packing):
        c = replace(cfg, data=replace(cfg.data, packing=mode))
        real = slots = 0
        for step in range(max(min(steps, cfg.train.steps), 1)):
            for r in range(dp):
                for mb in rank_microbatches(dataset, order, step * cfg.train.global_batch, c, dp,
                                            r, collate_fn):
                    real += mb["real_tokens"]
                    slots += mb["slots"]
        out[mode] = real / slots if slots else 0.0
    return out
