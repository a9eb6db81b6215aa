"""FPO stage (InfiFPO, methods.md §5): preference optimisation against the fused, clipped source reference.

    megatron-fusion train --config configs/demo/tiny_fpo.yaml --nproc 2

A sample is one pair ``(prompt, chosen, rejected)``; ``collate`` puts both responses of a pair in
the same micro-batch, ``tokens = cat([chosen, rejected])`` ``[2b, s]`` (``sequences_per_sample =
2`` tells the trainer the pipeline's p2p shapes are per sequence). On the last pipeline stage
``loss_func`` turns the vocab-parallel logits into ℓ_θ = Σ log π_θ / |y| per sequence
(``sequence_logprobs``: TP all-reduces inside) and feeds ``fpo_loss`` with

- ℓ_i of every source (offline files of ``tools/precompute_source_logprobs.py``: each source scored
  chosen and rejected with its OWN tokenizer), checked before step 1 against the run (dataset hash
  of the preference file, the source's tokenizer hash, every training pair present);
- ℓ_ref of the frozen initial pivot, computed ONCE in ``setup`` by a forward-only pass over the
  training pairs (Megatron's schedule, so any TP/PP/DP layout) and stored in
  ``<run.dir>/ref_logprobs/pivot_ref.logp`` (or ``fpo.ref_logprobs``) in the same checked
  ``SourceLogprobStore`` format; a resumed run reads it back instead of recomputing, so no second
  model is held in memory for the run.

Normalisation: ``loss_sum = Σ_pairs L_FPO`` and ``count = pairs`` of the micro-batch; Megatron sums
``count`` over micro-batches and DP ranks and divides the gradients once, so the loss is the mean
over the global batch whatever the micro-batching and DP size. Reports are ``[sum, count]``:
``fpo/loss``, ``rewards/chosen``, ``rewards/rejected``, ``fpo/margin``, ``fpo/accuracy`` (per pair),
``fpo/clip_fraction`` (per source value), ``fpo/selected/<source>`` (fraction of pairs whose
max-margin choice was that source). ``evaluate`` gives ``eval/pref_accuracy`` (fraction of held-out
pairs with ℓ_θ(chosen) > ℓ_θ(rejected)) on ``fpo.valid_preference``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_fusion.errors import UserError
from megatron_fusion.config import Config, ConfigError
from megatron_fusion.data.packing import is_packed, per_sample
from megatron_fusion.losses import fpo_loss, sequence_logprobs, token_logprobs
from megatron_fusion.parallel import to_device
from megatron_fusion.data.build import build_preference_dataset
from megatron_fusion.stages.base import Stage, register
from megatron_fusion.stages.sft import SFTStage

REF_SOURCE = "pivot_ref"      # the ``source`` field of the reference file's header


class SourceLogprobError(UserError, RuntimeError):
    """Source or reference log-probs that do not fit the run: names the file (and field/pair)."""


def collate_pairs(items: list[dict]) -> dict:
    """Pairs -> one micro-batch: rows 0..b-1 chosen, b..2b-1 rejected of the same pairs."""
    out = {k: torch.stack([it[f"chosen_{k}"] for it in items] + [it[f"rejected_{k}"] for it in items])
           for k in ("tokens", "labels", "loss_mask")}                   # [2b, s]
    out["sample_id"] = torch.tensor([int(it["sample_id"]) for it in items])  # [b]
    b2, s = out["tokens"].shape
    out["position_ids"] = torch.arange(s).unsqueeze(0).expand(b2, s).contiguous()
    out["slots"] = b2 * s
    out["real_tokens"] = (sum(int(it["chosen_length"]) + int(it["rejected_length"]) for it in items)
                          if all("chosen_length" in it for it in items) else out["slots"])
    return out


def pair_logprobs(batch: dict, output: torch.Tensor, vocab_size: int, tp_group):
    """(Σ log π over response tokens ``[2b]``, token counts ``[2b]``) of a micro-batch's chosen
    (rows 0..b-1) and rejected (b..2b-1) sequences. Packed rows (``data.packing``, methods.md
    §10): token log-probs over the rows, then per sequence from its segment."""
    if not is_packed(batch):
        return sequence_logprobs(output, batch["labels"], batch["loss_mask"],
                                 vocab_size=vocab_size, tp_group=tp_group)
    tok = token_logprobs(output, batch["labels"], vocab_size=vocab_size, tp_group=tp_group)
    keep = per_sample(batch, batch["loss_mask"], fill=0) > 0                 # [2b, s]
    tok = per_sample(batch, tok)                                             # [2b, s]
    return torch.where(keep, tok, torch.zeros_like(tok)).sum(-1), keep.sum(-1)


def _read_store(path, expected: dict, what: str):
    """Open a SourceLogprobStore, turning its format/header errors into SourceLogprobError."""
    from megatron_fusion.teachers.shards import SourceLogprobStore, TopKStoreError

    if not Path(path).exists():
        raise SourceLogprobError(f"{what}: log-prob file not found: {path}")
    try:
        return SourceLogprobStore(path, expected=expected)
    except TopKStoreError as e:
        raise SourceLogprobError(f"{what}: {e}") from None


def _normalised(store, sample_ids: list[int], path, what: str) -> torch.Tensor:
    """-> [n, 2] float64 (ℓ(chosen), ℓ(rejected)) per sample id; every pair present, counts > 0."""
    missing = [s for s in sample_ids if s not in store]
    if missing:
        raise SourceLogprobError(f"{what}: {len(missing)} training pairs have no log-probs in "
                                 f"{path} (first: sample id {missing[0]}); re-run the scoring tool")
    r = store.batch(sample_ids)
    nw, nl = r["chosen_tokens"].double(), r["rejected_tokens"].double()
    empty = ((nw <= 0) | (nl <= 0)).nonzero()
    if len(empty):
        raise SourceLogprobError(f"{what}: {path}: sample id {sample_ids[int(empty[0])]} has no "
                                 "response tokens under this model (cannot length-normalise)")
    return torch.stack([r["chosen_logprob"] / nw, r["rejected_logprob"] / nl], dim=1)


class _SequenceScores:
    """Forward-only stage: per-sequence summed log-prob and token count of each micro-batch."""

    def __init__(self, vocab_size: int, tp_group):
        self.vocab_size, self.tp_group = vocab_size, tp_group

    def loss_func(self, batch: dict, output: torch.Tensor):
        lp, n = sequence_logprobs(output, batch["labels"], batch["loss_mask"],
                                  vocab_size=self.vocab_size, tp_group=self.tp_group)  # [2b], [2b]
        scores = torch.stack([lp.detach().double(), n.double()])                        # [2, 2b]
        b = batch["sample_id"].shape[0]
        return lp.detach().sum(), torch.full((), b, dtype=torch.int, device=output.device), {
            "scores": scores}


@register("fpo")
class FPOStage(Stage):
    sequences_per_sample = 2
    has_evaluate = True

    def __init__(self, cfg: Config, vocab_size: int, groups, *, dataset=None, tokenizer=None):
        self.cfg, self.f, self.groups = cfg, cfg.fpo, groups
        self.vocab_size, self.dataset, self.tokenizer = vocab_size, dataset, tokenizer
        self.sft = SFTStage(vocab_size, groups.tp)
        if not self.f.sources_logprobs:
            raise ConfigError("fpo.sources_logprobs", "stage 'fpo' needs at least one source "
                              "log-prob file (tools/precompute_source_logprobs.py)")
        if self.f.source_tokenizers and len(self.f.source_tokenizers) != len(self.f.sources_logprobs):
            raise ConfigError("fpo.source_tokenizers", f"{len(self.f.source_tokenizers)} entries for "
                              f"{len(self.f.sources_logprobs)} fpo.sources_logprobs")
        self.sample_ids = [int(s) for s in dataset.sample_ids]
        self._row = {s: i for i, s in enumerate(self.sample_ids)}
        self.names, cols = [], []
        for j, path in enumerate(self.f.sources_logprobs):
            name, table = self._load_source(j, path)
            if name in self.names:
                raise SourceLogprobError(f"fpo source {name!r}: listed twice (second: {path})")
            self.names.append(name)
            cols.append(table)
        self.sources = torch.stack(cols, dim=1)         # [n_pairs, N, 2] ℓ_i(chosen), ℓ_i(rejected)
        self.ref: torch.Tensor | None = None            # [n_pairs, 2], filled by setup
        self.valid = (build_preference_dataset(cfg, tokenizer, self.f.valid_preference)
                      if self.f.valid_preference else None)
        self.report_keys = ["fpo/loss", "rewards/chosen", "rewards/rejected", "fpo/margin",
                            "fpo/accuracy", "fpo/clip_fraction"]
        if self.f.fusion == "max_margin":
            self.report_keys += [f"fpo/selected/{n}" for n in self.names]

    # --- inputs checked before step 1 ---------------------------------------------------------
    def _source_tokenizer(self, j: int, name: str):
        from megatron_fusion.tokenizers import load_tokenizer

        spec = self.f.source_tokenizers[j] if self.f.source_tokenizers else next(
            (t.tokenizer for t in self.cfg.fuse.teachers if t.name == name and t.tokenizer), None)
        if not spec:
            return None
        if not Path(spec).exists():
            raise SourceLogprobError(f"fpo source {name!r}: tokenizer not found: {spec}")
        return load_tokenizer(spec)

    def _load_source(self, j: int, path: str) -> tuple[str, torch.Tensor]:
        ds = self.dataset
        store = _read_store(path, {"dataset_hash": ds.file_hash}, f"fpo source {j} ({path})")
        name = store.header["source"]
        tok = self._source_tokenizer(j, name)
        if tok is not None:  # the file must come from this source's own tokenizer
            store = _read_store(path, {"dataset_hash": ds.file_hash,
                                       "source_tokenizer_hash": tok.content_hash},
                                f"fpo source {name!r}")
        return name, _normalised(store, self.sample_ids, path, f"fpo source {name!r}")

    def _ref_path(self) -> Path:
        return Path(self.f.ref_logprobs or Path(self.cfg.run.dir) / "ref_logprobs" / "pivot_ref.logp")

    def _ref_header(self):
        from megatron_fusion.teachers.shards import LogprobHeader

        return LogprobHeader(source=REF_SOURCE, source_tokenizer_hash=self.tokenizer.content_hash,
                             dataset_hash=self.dataset.file_hash,
                             meta={"layout_hash": self.dataset.dataset_hash,
                                   "seq_len": self.dataset.seq_len, "init": self.cfg.checkpoint.load})

    # --- the reference pass, once -------------------------------------------------------------
    def setup(self, *, model, groups, dp: int, resumed: bool, forward_step) -> None:
        """ℓ_ref of the initial pivot for every training pair: read back, or computed and stored."""
        self._model, self._forward_step, self._dp = model, forward_step, dp
        path = self._ref_path()
        if path.exists() and (resumed or self.f.ref_logprobs):
            h = self._ref_header()
            store = _read_store(path, {"source": REF_SOURCE, "dataset_hash": h.dataset_hash,
                                       "source_tokenizer_hash": h.source_tokenizer_hash},
                                "fpo reference")
            if store.header.get("meta", {}).get("layout_hash") != h.meta["layout_hash"]:
                raise SourceLogprobError(f"fpo reference: {path} was computed for another sequence "
                                         "length or data layout; delete it to recompute")
            self.ref = _normalised(store, self.sample_ids, path, "fpo reference")
            return
        if resumed:
            raise SourceLogprobError(f"fpo reference: {path} is missing but the run resumes from a "
                                     "checkpoint; the initial weights are gone, restart the run "
                                     "from step 0 or give fpo.ref_logprobs")
        scores = self.score_pairs(self.dataset, range(len(self.dataset)))        # [n, 4]
        if dist.get_rank() == 0:
            from megatron_fusion.teachers.shards import SourceLogprobStore

            records = [(sid, *scores[i].tolist()) for i, sid in enumerate(self.sample_ids)]
            SourceLogprobStore.write(path, self._ref_header(),
                                     [(r[0], r[1], int(r[2]), r[3], int(r[4])) for r in records])
        dist.barrier()
        self.ref = torch.stack([scores[:, 0] / scores[:, 1].clamp_min(1),
                                scores[:, 2] / scores[:, 3].clamp_min(1)], dim=1)

    def score_pairs(self, dataset, indices) -> torch.Tensor:
        """Forward-only pass over ``dataset[indices]`` under the run's layout.

        Returns ``[n, 4]`` float64 (Σlogp chosen, tokens chosen, Σlogp rejected, tokens rejected)
        on every rank: DP ranks score disjoint slices (padded with repeats of the first pair,
        dropped), the last stage's TP-rank-0 fills its rows and one world all-reduce shares them.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        g, mb, dp = self.groups, self.cfg.train.micro_batch, self._dp
        indices = list(indices)
        n = len(indices)
        per_rank = -(-n // (mb * dp)) * mb
        mine = [indices[i] if i < n else None
                for i in range(g.dp_rank * per_rank, (g.dp_rank + 1) * per_rank)]
        micro = [to_device(collate_pairs([dataset[i if i is not None else indices[0]]
                                          for i in mine[j:j + mb]]), g.device)
                 for j in range(0, per_rank, mb)]
        chunks = self._model
        for c in chunks:
            c.eval()
        with torch.no_grad():
            reports = get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, _SequenceScores(self.vocab_size, g.tp)),
                data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
                model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro),
                seq_length=self.cfg.model.seq_length, micro_batch_size=2 * mb, forward_only=True)
        for c in chunks:
            c.train()
        out = torch.zeros(n, 4, dtype=torch.float64, device=g.device)
        if g.is_last_stage and g.tp_rank == 0:
            pos = {idx: k for k, idx in enumerate(indices)}
            for j, rep in enumerate(reports):
                sc = rep["scores"]                                              # [2, 2b]
                for r, idx in enumerate(mine[j * mb:(j + 1) * mb]):
                    if idx is not None:
                        out[pos[idx]] = torch.stack([sc[0, r], sc[1, r], sc[0, mb + r], sc[1, mb + r]])
        dist.all_reduce(out)
        return out.cpu()             # setup/eval only: the host tables (ℓ_ref, accuracy) read it

    @classmethod
    def build_dataset(cls, cfg: Config, tokenizer):
        return build_preference_dataset(cfg, tokenizer)

    @classmethod
    def build(cls, cfg: Config, vocab_size: int, groups, dataset, tokenizer) -> "FPOStage":
        return cls(cfg, vocab_size, groups, dataset=dataset, tokenizer=tokenizer)

    def collate(self, items: list[dict]) -> dict:
        return collate_pairs(items)

    def evaluate(self, model=None) -> dict:
        """Held-out preference accuracy: fraction of pairs with ℓ_θ(chosen) > ℓ_θ(rejected)."""
        if self.valid is None or len(self.valid) == 0:
            return {}
        if model is not None:
            self._model = model
        n = min(len(self.valid), self.cfg.train.eval_batches * self.cfg.train.micro_batch * self._dp)
        s = self.score_pairs(self.valid, range(n))
        ell_w, ell_l = s[:, 0] / s[:, 1].clamp_min(1), s[:, 2] / s[:, 3].clamp_min(1)
        return {"eval/pref_accuracy": (ell_w > ell_l).double().mean().item(),
                "eval/pref_margin": (ell_w - ell_l).mean().item()}

    def eval_stage(self):
        return self.sft

    # --- per step -----------------------------------------------------------------------------
    def prepare_step(self, microbatches, groups) -> None:
        if not groups.is_last_stage:
            return
        for mb in microbatches:
            rows = torch.tensor([self._row[int(s)] for s in mb["sample_id"]])  # host ids
            mb.update(to_device({"ref": self.ref[rows],                     # [b, 2]
                                 "sources": self.sources[rows]},            # [b, N, 2]
                                groups.device))

    def loss_func(self, batch: dict, output: torch.Tensor):
        b = batch["sample_id"].shape[0]
        lp, n = pair_logprobs(batch, output, self.vocab_size, self.groups.tp)     # [2b]
        ell = lp.double() / n.clamp_min(1).double()      # ℓ_θ, float64 like the stored ℓ_ref, ℓ_i
        ref, src = batch["ref"], batch["sources"]        # on the device since prepare_step
        losses, m = fpo_loss(ell[:b], ell[b:], ref[:, 0], ref[:, 1], src[..., 0], src[..., 1],
                             beta=self.f.beta, ref_offset=self.f.ref_offset, fusion=self.f.fusion)
        pairs = torch.full((), float(b), dtype=torch.float64, device=output.device)
        values = 2.0 * b * len(self.names)
        report = {"fpo/loss": torch.stack([losses.detach().sum(), pairs])}
        for k in ("rewards/chosen", "rewards/rejected", "fpo/margin", "fpo/accuracy"):
            report[k] = torch.stack([m[k].double() * b, pairs])
        report["fpo/clip_fraction"] = torch.stack(
            [m["fpo/clip_fraction"].double() * values, pairs.new_full((), values)])
        if self.f.fusion == "max_margin":
            for i, name in enumerate(self.names):
                report[f"fpo/selected/{name}"] = torch.stack([m[f"fpo/selected/source_{i}"].double(), pairs])
        return losses.sum().float(), torch.full((), b, dtype=torch.int, device=output.device), report
