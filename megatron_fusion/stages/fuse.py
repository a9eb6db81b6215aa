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

Offline teachers are checked before step 1 (docs/methods.md §6): header fields (teacher, K,
data, both tokenizer hashes, ``meta.eps`` / ``meta.alignment`` == ``fuse.eps`` /
``fuse.alignment``), the aligned fraction their shards record against
``fuse.min_aligned_fraction`` (warn) and ``fuse.min_aligned_fraction_hard`` (stop); each
shard's checksum when it is first read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_fusion.config import Config, ConfigError
from megatron_fusion.errors import TeacherDataError
from megatron_fusion.losses import combine_teachers, cross_entropy_and_topk, gld_loss, uld_loss
from megatron_fusion.parallel import to_device
from megatron_fusion.stages.base import Stage, register
from megatron_fusion.stages.sft import REPORT_CE, SFTStage
from megatron_fusion.teachers.offline import OfflineTeacher
from megatron_fusion.teachers.online.protocol import batch_fingerprint


@register("fuse")
class FuseStage(Stage):
    def __init__(self, cfg: Config, vocab_size: int, groups, *, dataset=None, tokenizer=None,
                 teachers: list | None = None):
        f = cfg.fuse
        self.cfg, self.f, self.groups = cfg, f, groups
        self.vocab_size = vocab_size
        self.sft = SFTStage(vocab_size, groups.tp)
        self.names = [t.name for t in f.teachers]
        static = torch.tensor([t.weight for t in f.teachers], dtype=torch.float64)
        if (static <= 0).any():
            raise ConfigError("fuse.teachers[].weight", "must be > 0")
        self.static_w = (static / static.sum()).to(groups.device)
        self.report_keys = [REPORT_CE, "loss/uld", "loss/gld", "loss/total"]
        for n in self.names:
            self.report_keys += [f"loss/uld/{n}", f"loss/gld/{n}", f"teacher/{n}/aligned_frac",
                                 f"teacher/{n}/weight"]
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
                teacher = OfflineTeacher(t.name, t.topk_dir, expected, strict=True)
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
        counts = torch.zeros(1 + 2 * len(self.teachers), dtype=torch.float64, device=groups.device)
        for mb in microbatches:
            resp = mb["loss_mask"] > 0
            mb["teachers"] = []
            for j, t in enumerate(self.teachers):
                values, ids, aligned, ce = t.fetch(mb["sample_id"], seq)[:4]   # host tensors
                b = mb["tokens"].shape[0]
                if values.shape != (b, seq, k) or ids.shape != (b, seq, k) or aligned.shape != (b, seq):
                    raise TeacherDataError(
                        f"teacher {t.name}: top-K shapes {tuple(values.shape)}/{tuple(ids.shape)}/"
                        f"{tuple(aligned.shape)} do not match the batch [b={b}, s={seq}, K={k}]")
                moved = to_device({"values": values, "ids": ids, "aligned": aligned, "ce": ce},
                                  groups.device)
                mask = moved["aligned"] & resp
                mb["teachers"].append({"values": moved["values"], "ids": moved["ids"],
                                       "mask": mask, "ce": moved["ce"],
                                       "fingerprint": batch_fingerprint(mb["sample_id"])})
                counts[1 + 2 * j] += mask.sum()
                counts[2 + 2 * j] += mask.any(dim=1).sum()
            counts[0] += resp.sum()
        dist.all_reduce(counts, group=groups.dp)
        self._norm = counts.cpu().tolist()    # once per step: [N_ce, N_uld_j, N_gld_j ...]

    def _weights(self, batch) -> torch.Tensor:
        """[N, b] per-sample teacher weights (sum to 1 over teachers)."""
        n, b = len(self.teachers), batch["tokens"].shape[0]
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
        # gradient in backward (CE + top-K terms), not one per loss (PERF target 2).
        student = cross_entropy_and_topk(output, batch["labels"], f.k, vocab_size=self.vocab_size,
                                         tp_group=self.groups.tp)
        mask_ce = batch["loss_mask"].float()                                     # [b, s]
        ce_sum, ce_count = (student.ce * mask_ce).sum(), mask_ce.sum()           # == SFTStage.ce_sum
        n_ce = max(norm[0], 1.0)
        # GLD always uses the full-vocab z-score; ULD with zscore=topk the raw top-K values.
        st_full = student.std_topk
        st_uld = st_full if f.zscore == "full" else student.raw_topk
        w = self._weights(batch)                                                  # [N, b]
        uld_total = output.new_zeros((), dtype=torch.float32)
        gld_total = output.new_zeros((), dtype=torch.float32)
        report = {REPORT_CE: torch.stack([ce_sum.detach(), ce_count])}
        for j, (name, t) in enumerate(zip(self.names, batch["teachers"])):
            mask = t["mask"]
            u_seq, u_cnt = uld_loss(None, t["values"], mask, k=f.k, temperature=f.temperature,
                                    zscore=f.zscore, vocab_size=self.vocab_size,
                                    tp_group=self.groups.tp, student_topk=st_uld, reduction="sequence")
            g_seq, g_cnt = gld_loss(None, t["values"], t["ids"], mask, k=f.k,
                                    vocab_size=self.vocab_size, tp_group=self.groups.tp,
                                    student_topk=st_full, reduction="sequence")
            n_uld, n_gld = norm[1 + 2 * j], norm[2 + 2 * j]
            if n_uld > 0:
                uld_total = uld_total + (w[j] * u_seq).sum() / n_uld
            if n_gld > 0:
                gld_total = gld_total + (w[j] * g_seq).sum() / n_gld
            report[f"loss/uld/{name}"] = torch.stack([u_seq.detach().sum(), u_cnt.sum().float()])
            report[f"loss/gld/{name}"] = torch.stack([g_seq.detach().sum(), g_cnt.sum().float()])
            resp = batch["loss_mask"].sum()
            report[f"teacher/{name}/aligned_frac"] = torch.stack([mask.sum().float(), resp.float()])
            report[f"teacher/{name}/weight"] = torch.stack(
                [w[j].sum().detach().float(), w.new_full((), float(w.shape[1]))])
        loss_sum = f.lambda_ce * ce_sum + n_ce * (f.lambda_uld * uld_total + f.lambda_gld * gld_total)
        report["loss/uld"] = torch.stack([(n_ce * uld_total).detach(), ce_count])
        report["loss/gld"] = torch.stack([(n_ce * gld_total).detach(), ce_count])
        report["loss/total"] = torch.stack([loss_sum.detach(), ce_count])
        return loss_sum, ce_count.to(torch.int), report
