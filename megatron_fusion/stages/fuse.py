"""Fusion stage (InfiFusion + InfiGFusion): CE + ULD + GLD against N teachers' top-K.

Teacher top-K arrives per micro-batch on the *last pipeline stage only* (never through the
activation p2p): ``prepare_step`` fetches it by sample id from each teacher's source (offline
shards, or the online teacher group: ``megatron_fusion.teachers.online.client.OnlineTeacher``), checks K, shape
and the batch's sample ids, and stores it in the micro-batch dict; other stages drop nothing
because they never load it.

Normalisation (docs/methods.md §4): with global counts known before the forward — N_ce response tokens,
N_uld_j aligned response positions and N_gld_j sequences with any, for teacher j, summed over the
step's micro-batches and DP ranks — the micro-batch loss is

    loss_sum = λ_ce·Σce + N_ce·( λ_uld·Σ_j Σ_b w_jb·uld_jb / N_uld_j + λ_gld·Σ_j Σ_b w_jb·gld_jb / N_gld_j )
    count    = this micro-batch's response tokens

and Megatron divides the summed gradients once by Σcount = N_ce, giving
λ_ce·CE + λ_uld·L_ULD + λ_gld·L_GLD with every term its own global mean, independent of
micro-batching and DP size. Reports use the same scaling, so ``loss/uld`` etc. are exact.
Teacher weights w_jb: ``uniform`` (the config's static weights, normalised), ``minCE`` /
``avgCE`` from each teacher's CE on the gold response per byte of the response text (nats/byte,
so that a finer tokenizer does not look better for the same text), stored with its top-K or
sent with it online (FuseLLM; docs/methods.md §2).

``fuse.loss: hybrid`` (docs/methods.md §9) replaces λ_uld·ULD_j by the hybrid term of each
teacher, ``w_M,j (KL_M + tail) + w_U,j ULD_U`` per aligned position, from the teacher's top-K
log-probs (``fetch``'s 5th element) and its ids mapped to pivot ids by the teacher's vocabulary
match (``teachers[].vocab_match``, built from both tokenizers on first use and cached). ALL
teachers' matched entries go into ONE call of the fused CE + top-K Function (``match_ids
[b, s, N, K]``): still one sweep over the shard, one all-gather, one all-reduce (4 + N scalars,
4 + 2N with the tail bucket) and one shard-sized gradient; GLD uses the same student top-K. The
same teacher weights w_jb and the same normaliser N_uld_j apply:

    loss_sum = λ_ce·Σce + N_ce·( Σ_j Σ_b w_jb·hyb_jb / N_uld_j + λ_gld·Σ_j Σ_b w_jb·gld_jb / N_gld_j )

With packed rows (``data.packing``, methods.md §10) the per-sample log-probs, mapped ids and
mask are placed into the rows the Function runs on (``to_rows``, once in ``prepare_step``), and
the per-position parts are summed per sample (``per_sample``) where ``w_jb`` applies. Terms are
reported exactly as ``loss/hybrid`` and its parts ``loss/matched``, ``loss/unmatched``,
``loss/tail`` (Σ_j w_j mean_t of each, unweighted by w_M / w_U), per teacher
``loss/hybrid/<name>`` and ``teacher/<name>/matched_mass`` (share of its top-K probability on
matched tokens).

Offline teachers are checked before step 1 (docs/methods.md §6): header fields (teacher, K,
data, both tokenizer hashes, ``meta.eps`` / ``meta.alignment`` == ``fuse.eps`` /
``fuse.alignment``), the aligned fraction their shards record against
``fuse.min_aligned_fraction`` (warn) and ``fuse.min_aligned_fraction_hard`` (stop); each
shard's checksum when it is first read.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_fusion.config import Config, ConfigError
from megatron_fusion.data.packing import fetch_per_sample, per_sample, to_rows
from megatron_fusion.errors import TeacherDataError
from megatron_fusion.losses import (HybridLossConfig, combine_teachers, cross_entropy_and_topk,
                                    cross_entropy_topk_and_match, gld_loss, hybrid_terms,
                                    uld_loss)
from megatron_fusion.losses.hybrid import clean_teacher
from megatron_fusion.parallel import to_device
from megatron_fusion.stages.base import Stage, register
from megatron_fusion.stages.sft import REPORT_CE, SFTStage
from megatron_fusion.teachers.offline import OfflineTeacher
from megatron_fusion.teachers.online.protocol import batch_fingerprint


@register("fuse")
class FuseStage(Stage):
    def __init__(self, cfg: Config, vocab_size: int, groups, *, dataset=None, tokenizer=None,
                 teachers: list | None = None, matches: list | None = None):
        """``teachers`` / ``matches`` (tests): teacher sources with ``fetch`` and, for
        ``fuse.loss: hybrid``, their ``VocabMatch``es, in config order, instead of building them
        from the config."""
        f = cfg.fuse
        self.cfg, self.f, self.groups = cfg, f, groups
        self.vocab_size = vocab_size
        self.sft = SFTStage(vocab_size, groups.tp)
        self.names = [t.name for t in f.teachers]
        self.hybrid = f.loss == "hybrid"
        static = torch.tensor([t.weight for t in f.teachers], dtype=torch.float64)
        if (static <= 0).any():
            raise ConfigError("fuse.teachers[].weight", "must be > 0")
        self.static_w = (static / static.sum()).to(groups.device)
        term = "hybrid" if self.hybrid else "uld"
        self.report_keys = [REPORT_CE, f"loss/{term}", "loss/gld", "loss/total"]
        if self.hybrid:
            self.report_keys += ["loss/matched", "loss/unmatched"] + (
                ["loss/tail"] if f.tail_bucket else [])
        for n in self.names:
            self.report_keys += [f"loss/{term}/{n}", f"loss/gld/{n}", f"teacher/{n}/aligned_frac",
                                 f"teacher/{n}/weight"]
            if self.hybrid:
                self.report_keys.append(f"teacher/{n}/matched_mass")
        # fuse.grad_diagnostics: per term its squared gradient norm at the logits and its dot
        # product with the CE's, reduced as reports; derive_metrics turns them into norms/cosines
        self.grad_terms = ["ce", term, "gld"] if f.grad_diagnostics else []
        self.report_keys += [f"grad/{n}_sq" for n in self.grad_terms] + \
            [f"grad/{n}_dot_ce" for n in self.grad_terms[1:]]
        self._n_reports, self._grad_now = 1, False
        self.matches = []
        if self.hybrid:
            if tokenizer is None and dataset is not None:
                tokenizer = dataset.tokenizer
            self.matches = matches if matches is not None else \
                self._vocab_matches(cfg, tokenizer, groups)
            adaptive = f.lambda_matched == "adaptive"
            hcfg = HybridLossConfig(
                lambda_matched=1.0 if adaptive else float(f.lambda_matched),
                lambda_unmatched=1.0 if adaptive else float(f.lambda_unmatched),
                adaptive=adaptive, tail_bucket=f.tail_bucket)
            # per teacher (w_M, w_U), and its id table on the host (fetch gives host ids);
            # None on ranks without the logits (not the last pipeline stage)
            self.hybrid_w = [None if m is None else hcfg.weights(m.matched_fraction)
                             for m in self.matches]
            self.match_tables = [None if m is None else m.dense() for m in self.matches]
        if teachers is not None:
            self.teachers = teachers
        else:
            self.teachers = []
            online = {}
            if any(t.source == "online" for t in f.teachers):
                from megatron_fusion.teachers.online.client import online_sources

                online = online_sources(cfg, groups)
            for t in f.teachers:
                if t.source == "online":  # top-K streamed by the teacher group
                    self.teachers.append(online[t.name])
                    continue
                from megatron_fusion.tokenizers import load_tokenizer

                t_tok = load_tokenizer(t.tokenizer) if t.tokenizer else None
                # the run's top-K recipe: the shards must have been made with it (as online)
                expected = {"teacher": t.name, "k": f.k, "meta.eps": f.eps,
                            "meta.alignment": f.alignment}
                if dataset is not None:
                    expected.update(dataset_hash=dataset.dataset_hash,
                                    pivot_tokenizer_hash=dataset.tokenizer.content_hash)
                if t_tok is not None:
                    expected["teacher_tokenizer_hash"] = t_tok.content_hash
                # the hybrid loss needs the teachers' log-probs: old shards are refused by name
                need = {"require_logprobs": True} if self.hybrid else {}
                teacher = OfflineTeacher(t.name, t.topk_dir, expected, strict=True, **need)
                teacher.check_alignment(f.min_aligned_fraction, f.min_aligned_fraction_hard)
                self.teachers.append(teacher)
            if dataset is not None:  # every training sample must have top-K: fail before step 1
                ids = [int(dataset[i]["sample_id"]) for i in range(len(dataset))]
                for t in self.teachers:
                    if isinstance(t, OfflineTeacher):
                        t.check_covers(ids)
        if f.weighting != "uniform" and not all(hasattr(t.reader, "teacher_ce_byte") for t in self.teachers
                                                if isinstance(t, OfflineTeacher)):
            raise ConfigError("fuse.weighting", f"{f.weighting} needs teacher CE in the top-K "
                              "shards (re-run tools/precompute_teacher_topk.py)")
        self._norm = None

    @staticmethod
    def _vocab_matches(cfg: Config, pivot, groups) -> list:
        """Each teacher's vocabulary match (methods.md §9): ``teachers[].vocab_match`` or
        <run.dir>/vocab_match/<name>.vmap, built from both tokenizers when missing (every
        last-stage rank may write it: the write is atomic and the content the same)."""
        if not groups.is_last_stage:
            return [None] * len(cfg.fuse.teachers)
        from megatron_fusion.teachers.vocab_match import VocabMatch
        from megatron_fusion.tokenizers import load_tokenizer

        if pivot is None:
            raise ConfigError("fuse.loss", "hybrid needs the pivot tokenizer (data.tokenizer)")
        out = []
        for t in cfg.fuse.teachers:
            path = t.vocab_match or f"{cfg.run.dir}/vocab_match/{t.name}.vmap"
            out.append(VocabMatch.load_or_build(path, load_tokenizer(t.tokenizer, name=t.name),
                                                pivot))
        return out

    @classmethod
    def build(cls, cfg: Config, vocab_size: int, groups, dataset, tokenizer) -> "FuseStage":
        return cls(cfg, vocab_size, groups, dataset=dataset, tokenizer=tokenizer)

    def eval_stage(self):
        return self.sft

    def step_metrics(self) -> dict:
        """Online teachers: ``teacher/wait_s`` (this step's time blocked on them) and
        ``teacher/{name}/tokens_per_s`` (teacher tokens over its compute time)."""
        out, wait = {}, 0.0
        for t in self.teachers:
            if hasattr(t, "pop_metrics"):
                m = t.pop_metrics()
                wait += m["wait_s"]
                out[f"teacher/{t.name}/tokens_per_s"] = m["tokens_per_s"]
        if out:
            out["teacher/wait_s"] = wait
        return out

    # --- per step -----------------------------------------------------------------------------
    def prepare_step(self, microbatches, groups) -> None:
        """Teacher top-K per micro-batch, moved to ``groups.device`` once, and the step's global
        counts (one DP all-reduce on the device, read back once: ``self._norm`` is host floats,
        so ``loss_func`` branches on them without a sync)."""
        if not groups.is_last_stage:
            return
        seq = self.cfg.model.seq_length
        k = self.f.k
        every = self.f.grad_diagnostics
        self._grad_now = bool(every) and (self.step <= 1 or self.step % every == 0)
        if self._grad_now:
            self._n_reports = len(microbatches) * groups.dp_size   # grad/* reports, world
        counts = torch.zeros(1 + 2 * len(self.teachers), dtype=torch.float64, device=groups.device)
        # per sample, in each batch's sample order (packed rows: data/packing.py, methods.md §10)
        fetched = [fetch_per_sample(t.fetch, microbatches, seq, self.cfg.train.micro_batch)
                   for t in self.teachers]
        for i, mb in enumerate(microbatches):
            resp = per_sample(mb, mb["loss_mask"], fill=0) > 0            # [b, s] per sample
            mb["teachers"] = []
            for j, t in enumerate(self.teachers):
                got = fetched[j][i]                                       # host tensors
                values, ids, aligned, ce = got[:4]
                b = mb["sample_id"].shape[0]
                if values.shape != (b, seq, k) or ids.shape != (b, seq, k) or aligned.shape != (b, seq):
                    raise TeacherDataError(
                        f"teacher {t.name}: top-K shapes {tuple(values.shape)}/{tuple(ids.shape)}/"
                        f"{tuple(aligned.shape)} do not match the batch [b={b}, s={seq}, K={k}]")
                host = {"values": values, "ids": ids, "aligned": aligned, "ce": ce}
                if self.hybrid:
                    host.update(self._hybrid_inputs(j, t.name, got, b, seq, k))
                moved = to_device(host, groups.device)
                mask = moved["aligned"] & resp
                entry = {"values": moved["values"], "ids": moved["ids"], "mask": mask,
                         "ce": moved["ce"], "logp": None, "mids": None, "hmask": None,
                         "fingerprint": batch_fingerprint(mb["sample_id"])}
                if self.hybrid:   # the fused Function's inputs: in the batch's row layout
                    entry.update(self._hybrid_rows(mb, moved["logp"], moved["mids"], mask))
                mb["teachers"].append(entry)
                counts[1 + 2 * j] += mask.sum()
                counts[2 + 2 * j] += mask.any(dim=1).sum()
            counts[0] += resp.sum()
        dist.all_reduce(counts, group=groups.dp)
        self._norm = counts.cpu().tolist()    # once per step: [N_ce, N_uld_j, N_gld_j ...]

    def _hybrid_inputs(self, j: int, name: str, got: tuple, b: int, seq: int, k: int) -> dict:
        """The teacher's top-K log-probs and its ids mapped to pivot ids (-1: unmatched), on the
        host as fetch gives them; checked here so that a bad input is one line naming it."""
        logp = got[4] if len(got) > 4 else None
        if logp is None:
            raise TeacherDataError(f"teacher {name}: no teacher log-probs with its top-K; "
                                   "fuse.loss=hybrid needs them (re-run the precompute)")
        if logp.shape != (b, seq, k):
            raise TeacherDataError(f"teacher {name}: log-probs of shape {tuple(logp.shape)} do "
                                   f"not match the batch [b={b}, s={seq}, K={k}]")
        ids, aligned, table = got[1], got[2].bool(), self.match_tables[j]
        live = torch.where(aligned[..., None], ids.long(), 0)
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= table.numel()):
            raise TeacherDataError(f"teacher {name}: top-K ids outside its vocabulary of "
                                   f"{table.numel()} (the vocabulary match's teacher tokenizer)")
        mids = torch.where(aligned[..., None], table[live], -1)
        return {"logp": logp.float(), "mids": mids}

    @staticmethod
    def _hybrid_rows(mb: dict, logp: torch.Tensor, mids: torch.Tensor, mask: torch.Tensor) -> dict:
        """Per-sample ``[n, s, K]`` log-probs / mapped ids and the ``[n, s]`` aligned response
        mask -> the batch's rows ``[b, s, ...]``, where the fused CE Function reads them per token
        (``to_rows``, the inverse of ``per_sample``: on the device, no collective). Slots of no
        sample get the "ignore" fill: mask False, id -1, log-prob -inf. Unpacked: unchanged."""
        return {"logp": to_rows(mb, logp, -torch.inf), "mids": to_rows(mb, mids, -1),
                "hmask": to_rows(mb, mask, False)}

    def _weights(self, batch) -> torch.Tensor:
        """[N, b] per-sample teacher weights (sum to 1 over teachers)."""
        n, b = len(self.teachers), batch["sample_id"].shape[0]
        if self.f.weighting == "uniform":
            return self.static_w.float().unsqueeze(1).expand(n, b)
        ce = torch.stack([t["ce"].float() for t in batch["teachers"]])           # [N, b]
        # A teacher with no response token in a sample's window has CE = NaN: it gets no weight
        # there; a sample no teacher scored falls back to equal weights.
        ce = torch.where(torch.isnan(ce), torch.full_like(ce, float("inf")), ce)
        none = torch.isinf(ce).all(dim=0, keepdim=True)
        ce = torch.where(none, torch.zeros_like(ce), ce)
        _, w = combine_teachers(torch.zeros(n, b, device=ce.device), self.f.weighting, teacher_ce=ce)
        return w

    def loss_func(self, batch: dict, output: torch.Tensor):
        f, norm = self.f, self._norm
        for t in batch["teachers"]:
            if t["fingerprint"] != batch_fingerprint(batch["sample_id"]):
                raise TeacherDataError("teacher top-K belongs to another batch (fingerprint mismatch)")
        # CE and the student top-K shared by ULD and GLD from ONE autograd.Function: one pass over
        # the logits shard, one all-gather + one all-reduce per token, and ONE shard-sized
        # gradient in backward (CE + top-K terms), not one per loss (PERF target 2). The hybrid
        # loss adds every teacher's matched entries to the same call.
        if self.hybrid:   # row layout ("hmask" etc., prepare_step): the Function runs on the rows
            cleaned = [clean_teacher(t["logp"], t["mids"], t["hmask"]) for t in batch["teachers"]]
            student = cross_entropy_topk_and_match(
                output, batch["labels"], f.k, match_ids=torch.stack([m for _, _, m in cleaned], -2),
                match_probs=torch.stack([p for p, _, _ in cleaned], -2), tail_bucket=f.tail_bucket,
                vocab_size=self.vocab_size, tp_group=self.groups.tp)
        else:
            student = cross_entropy_and_topk(output, batch["labels"], f.k,
                                             vocab_size=self.vocab_size, tp_group=self.groups.tp)
        mask_ce = batch["loss_mask"].float()                                     # [b, s]
        ce_sum, ce_count = (student.ce * mask_ce).sum(), mask_ce.sum()           # == SFTStage.ce_sum
        n_ce = max(norm[0], 1.0)
        # GLD always uses the full-vocab z-score; ULD with zscore=topk the raw top-K values.
        # ULD and GLD per sample: the student's top-K in the teachers' per-sample layout
        st_full = tuple(per_sample(batch, x) for x in student.std_topk)
        st_uld = st_full if f.zscore == "full" else tuple(per_sample(batch, x)
                                                           for x in student.raw_topk)
        w = self._weights(batch)                                                  # [N, b]
        term = "hybrid" if self.hybrid else "uld"
        dist_total = output.new_zeros((), dtype=torch.float32)      # the ULD or hybrid term
        gld_total = output.new_zeros((), dtype=torch.float32)
        parts = {p: output.new_zeros((), dtype=torch.float32)
                 for p in ("matched", "unmatched", "tail")}         # hybrid reports only
        report = {REPORT_CE: torch.stack([ce_sum.detach(), ce_count])}
        for j, (name, t) in enumerate(zip(self.names, batch["teachers"])):
            mask = t["mask"]
            n_uld, n_gld = norm[1 + 2 * j], norm[2 + 2 * j]
            if self.hybrid:
                # per position on the rows, then summed per sample (the weights w_jb are per
                # sample): one gather of the three parts, 0 after each sample's length
                h = hybrid_terms(student.teacher(j), t["logp"], cleaned[j][2], t["hmask"],
                                 tail_bucket=f.tail_bucket)
                per = per_sample(batch, torch.stack([h.matched, h.tail, h.unmatched], -1),
                                 fill=0.0).sum(1)                            # [b, 3] per sample
                w_m, w_u = self.hybrid_w[j]
                d_seq = w_m * (per[:, 0] + per[:, 1]) + w_u * per[:, 2]       # [b]
                d_cnt = mask.sum(-1)
                if n_uld > 0:
                    for i, p in enumerate(("matched", "tail", "unmatched")):
                        parts[p] = parts[p] + (w[j] * per[:, i].detach()).sum() / n_uld
                report[f"teacher/{name}/matched_mass"] = torch.stack(
                    [h.matched_mass.sum().float(), h.teacher_mass.sum().float()])
            else:
                d_seq, d_cnt = uld_loss(None, t["values"], mask, k=f.k, temperature=f.temperature,
                                        zscore=f.zscore, vocab_size=self.vocab_size,
                                        tp_group=self.groups.tp, student_topk=st_uld,
                                        reduction="sequence")
            g_seq, g_cnt = gld_loss(None, t["values"], t["ids"], mask, k=f.k,
                                    vocab_size=self.vocab_size, tp_group=self.groups.tp,
                                    student_topk=st_full, reduction="sequence")
            if n_uld > 0:
                dist_total = dist_total + (w[j] * d_seq).sum() / n_uld
            if n_gld > 0:
                gld_total = gld_total + (w[j] * g_seq).sum() / n_gld
            report[f"loss/{term}/{name}"] = torch.stack([d_seq.detach().sum().float(),
                                                         d_cnt.sum().float()])
            report[f"loss/gld/{name}"] = torch.stack([g_seq.detach().sum(), g_cnt.sum().float()])
            resp = batch["loss_mask"].sum()
            report[f"teacher/{name}/aligned_frac"] = torch.stack([mask.sum().float(), resp.float()])
            report[f"teacher/{name}/weight"] = torch.stack(
                [w[j].sum().detach().float(), w.new_full((), float(w.shape[1]))])
        lam = 1.0 if self.hybrid else f.lambda_uld      # hybrid: w_M / w_U weigh its parts
        loss_sum = f.lambda_ce * ce_sum + n_ce * (lam * dist_total + f.lambda_gld * gld_total)
        report[f"loss/{term}"] = torch.stack([(n_ce * dist_total).detach(), ce_count])
        if self.hybrid:
            for p in ("matched", "unmatched") + (("tail",) if f.tail_bucket else ()):
                report[f"loss/{p}"] = torch.stack([n_ce * parts[p], ce_count])
        report["loss/gld"] = torch.stack([(n_ce * gld_total).detach(), ce_count])
        report["loss/total"] = torch.stack([loss_sum.detach(), ce_count])
        if self._grad_now:
            report.update(self._grad_report(output, [
                f.lambda_ce * ce_sum / n_ce, lam * dist_total if lam else None,
                f.lambda_gld * gld_total if f.lambda_gld else None]))
        return loss_sum, ce_count.to(torch.int), report

    def _grad_report(self, output: torch.Tensor, terms: list) -> dict:
        """fuse.grad_diagnostics: d(term)/d(logits) of each term of this micro-batch's share of the
        objective (``loss_sum / N_ce``), by autograd through the loss Function only (the graph is
        kept for the step's backward). Reports ``[sum, 1 / reports per step]`` so the reduced
        value is the step's sum over micro-batches and DP replicas of ||g||^2 and <g, g_ce>;
        the vocab shards' parts are summed over TP here (every TP rank joins)."""
        grads = []
        for t in terms:
            g = None
            if t is not None and t.requires_grad:
                g = torch.autograd.grad(t, output, retain_graph=True, allow_unused=True)[0]
            grads.append(None if g is None else g.float())
        zero = output.new_zeros((), dtype=torch.float32)
        ce = grads[0]
        vals = [zero if g is None else (g * g).sum() for g in grads]
        vals += [zero if g is None or ce is None else (g * ce).sum() for g in grads[1:]]
        vec = torch.stack(vals).double()
        if self.groups.tp_size > 1:
            dist.all_reduce(vec, group=self.groups.tp)
        keys = [f"grad/{n}_sq" for n in self.grad_terms] + \
            [f"grad/{n}_dot_ce" for n in self.grad_terms[1:]]
        share = vec.new_full((), 1.0 / self._n_reports)
        return {k: torch.stack([v, share]) for k, v in zip(keys, vec)}

    def derive_metrics(self, metrics: dict) -> dict:
        """fuse.grad_diagnostics: the reduced squared norms and dot products -> ``grad/<term>``
        (L2 norm), ``grad/<term>_over_ce`` and ``grad/cos_<term>_ce`` (0 where a norm is 0)."""
        if not self.grad_terms:
            return metrics
        sq = {n: max(metrics.pop(f"grad/{n}_sq"), 0.0) for n in self.grad_terms}
        dots = {n: metrics.pop(f"grad/{n}_dot_ce") for n in self.grad_terms[1:]}
        if sq["ce"] == 0.0:             # not a diagnostics step (no report): nothing to derive
            return metrics
        norm = {n: math.sqrt(v) for n, v in sq.items()}
        for n in self.grad_terms:
            metrics[f"grad/{n}"] = norm[n]
        for n in self.grad_terms[1:]:
            both = norm[n] * norm["ce"]
            metrics[f"grad/{n}_over_ce"] = norm[n] / norm["ce"] if norm["ce"] > 0 else 0.0
            metrics[f"grad/cos_{n}_ce"] = dots[n] / both if both > 0 else 0.0
        return metrics
