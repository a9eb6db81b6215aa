"""Offline teacher top-K: run one teacher over the pivot's SFT data, align, write shards (SPEC §6).

For every pivot sample the teacher encodes the *same text segments* with its own tokenizer
(``megatron_fusion.data.sft.encode_segments``), runs a forward pass, takes the standardised top-K
of its logits with the student's own ``standardized_topk`` (distributed over the teacher's vocab
shards when its backend is tensor-parallel), and the rows of the aligned teacher positions are
placed at the pivot positions (``megatron_fusion.align``). Only pivot positions whose label is a
response token are kept (``aligned_mask`` = aligned AND response). The same forward pass gives
each sample's teacher cross-entropy on the gold response over the teacher's *own* tokens
(``token_logprobs``, vocab-parallel): position j predicting token j+1 counts when token j+1 is a
response token of the teacher's encoding and ends inside the text the pivot's labels cover (a
truncated pivot sample limits it); stored per sample for the minCE / avgCE weights.

Backends implement ``TeacherBackend``: ``local_logits(input_ids [b, s]) -> [b, s, v_local]`` (this
rank's vocab shard on the model's device, any float dtype, padding columns allowed past
``vocab_size``), ``vocab_size`` (output rows that may be tokens), ``tp_group`` (None for a single
shard). The statistics (mean / std / logsumexp) and the top-K run over the teacher tokenizer's ids
only (``true_vocab_size``): an HF embedding padded past the tokenizer (Qwen2.5: 152,064 rows,
151,665 tokens) never reaches a shard. Device: the forward, top-K, log-probs and the placement at
pivot positions run on the logits' device; ONE host copy per batch (``to_host``) brings values,
ids, masks and CE sums back for the shard writer. ``HFTeacherBackend`` (transformers, local dir
or GGUF) is here; ``VocabShardedBackend`` splits a full-vocab backend Megatron-style across a TP
group (tests, and teachers whose logits are small enough to compute whole on each rank);
``MegatronTeacherBackend`` is a frozen megatron-fusion run (its config.yaml + dist checkpoint),
rebuilt at the current TP (vocab-sharded logits, resharded weights).

Shards: ``{out_dir}/{teacher}-{index:05d}.topk`` each covering ``samples_per_shard`` consecutive
dataset items. A finished shard (valid file with the expected header) is skipped on restart, so a
killed run continues where it stopped and produces byte-identical files (nothing time- or
order-dependent goes into a shard). In a TP group every rank computes, TP rank 0 writes.
CLI: ``tools/precompute_teacher_topk.py`` (``--backend megatron --checkpoint RUN_DIR`` under
``torchrun --nproc-per-node TP`` for a megatron-fusion teacher; ``--device`` / ``--dtype`` from
``add_backend_args``, shared with tools/precompute_source_logprobs.py: an HF teacher defaults to
``cuda:LOCAL_RANK`` in bf16 when CUDA is available, cpu fp32 otherwise).
"""

from __future__ import annotations

import contextlib

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from megatron_fusion.align import (aligned_fraction, mined_alignment, offset_alignment,
                                   report_alignment)
from megatron_fusion.data.sft import SFTDataset, encode_segments
from megatron_fusion.topk_store import TopKHeader, TopKStoreError, TopKWriter, read_topk_header

log = logging.getLogger(__name__)


class TeacherBackend(Protocol):
    vocab_size: int            # output rows that may be tokens (columns >= it are padding); the
                               # true vocab is the tokenizer's size (true_vocab_size), <= this
    tp_group: object           # torch.distributed group over the vocab shards, or None

    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] int64 -> logits [b, s, v_local] (this rank's vocab shard)."""
        ...


class HFTeacherBackend:
    """A transformers causal LM (local directory, or a GGUF file in it), eval, no grad, loaded in
    ``dtype`` onto ``device`` (the caller's rank device: ``cuda:LOCAL_RANK`` or cpu).

    ``vocab_size`` is the model's output rows (``config.vocab_size``), which may include padding
    rows no tokenizer id reaches (Qwen2.5: 152,064 rows, 151,665 tokens); the true vocabulary of
    a batch is the teacher tokenizer's size (``true_vocab_size``).
    """

    def __init__(self, model_dir: str | Path | None = None, *, gguf_file: str | None = None,
                 model=None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if model is None:
            from transformers import AutoModelForCausalLM

            kw = {"gguf_file": gguf_file} if gguf_file else {}
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kw)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.tp_group = None

    @torch.no_grad()
    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] (any device) -> [b, s, v] on ``self.device`` in the model's dtype
        (the top-K and log-prob functions compute in fp32 from bf16 without a full fp32 copy)."""
        out = self.model(input_ids=input_ids.to(self.device, non_blocking=True), use_cache=False)
        return out.logits                                           # [b, s, v]


class VocabShardedBackend:
    """This TP rank's Megatron-style vocab shard of a full-vocab backend's logits.

    The vocab is padded to a multiple of ``tp * pad_multiple``; rank r holds columns
    ``[r * v_local, (r + 1) * v_local)``; padding columns hold 0 (never selected: ``vocab_size``).
    """

    def __init__(self, full: TeacherBackend, tp_group, pad_multiple: int = 1):
        import torch.distributed as dist

        self.full, self.tp_group = full, tp_group
        self.vocab_size = full.vocab_size
        tp = dist.get_world_size(tp_group)
        self.rank = dist.get_rank(tp_group)
        m = tp * pad_multiple
        self.v_local = -(-self.vocab_size // m) * m // tp

    @torch.no_grad()
    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        z = self.full.local_logits(input_ids)                      # [b, s, v]
        a = self.rank * self.v_local
        out = z.new_zeros(*z.shape[:-1], self.v_local)             # [b, s, v/tp]
        n = max(0, min(self.v_local, self.vocab_size - a))
        out[..., :n] = z[..., a:a + n]
        return out


class MegatronTeacherBackend:
    """A frozen teacher that is a megatron-fusion run: GPTModel from its ``config.yaml``, weights
    from its dist checkpoint (resharded to this TP), eval mode, no grad.

    ``run_dir_or_checkpoint``: a run dir (its latest checkpoint), its ``checkpoints`` root or one
    ``iter_*`` checkpoint (the config is looked up in the run dir above it). Megatron's
    model-parallel state must be initialised (``init_student_groups(tp=...)``) with pipeline
    size 1; the model is built at that TP, and ``tp_group`` (default: that TP group) must be it.
    The embedding keeps the padded vocab the run was saved with, so any TP that divides it loads.
    ``precision`` ("bf16", "fp16", "fp32"; None = the run's ``train.precision``): the dtype the
    model is built and run in (the checkpoint's weights are cast on load). Device: this rank's
    ``cuda:current_device`` (``init_distributed`` set it to LOCAL_RANK) when CUDA is available.
    """

    def __init__(self, run_dir_or_checkpoint: str | Path, tp_group=None,
                 precision: str | None = None):
        import dataclasses
        import json

        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from megatron_fusion.checkpoint import load_model_weights, resolve_checkpoint
        from megatron_fusion.config import load_config
        from megatron_fusion.model import build_model

        src = Path(run_dir_or_checkpoint)
        ckpt = resolve_checkpoint(src)
        cfg_path = next((c for c in (src / "config.yaml", ckpt.parent.parent / "config.yaml")
                         if c.is_file()), None)
        if cfg_path is None:
            raise FileNotFoundError(f"{src}: no config.yaml of the run (looked in {src} and "
                                    f"{ckpt.parent.parent})")
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("MegatronTeacherBackend: Megatron's parallel state is not "
                               "initialised; call "
                               "megatron_fusion.parallel.init_student_groups(tp=...) first")
        if ps.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("MegatronTeacherBackend: a teacher runs with pipeline size 1, the "
                             "parallel state has "
                             f"pp={ps.get_pipeline_model_parallel_world_size()}; "
                             "init_student_groups(tp=..., pp=1) for the teacher")
        group = ps.get_tensor_model_parallel_group()
        if tp_group is not None and (dist.get_process_group_ranks(tp_group)
                                     != dist.get_process_group_ranks(group)):
            raise ValueError("MegatronTeacherBackend: tp_group must be Megatron's tensor-parallel "
                             "group (the model's layers communicate over it)")
        tp = ps.get_tensor_model_parallel_world_size()
        cfg = load_config(cfg_path)
        if cfg.model.vocab_size <= 0:
            raise ValueError(f"{cfg_path}: model.vocab_size is {cfg.model.vocab_size}; a run's "
                             "config.yaml (written by the trainer) has the true vocab size")
        meta = json.loads((ckpt / "meta.json").read_text())
        saved_tp = int(meta.get("layout", {}).get("tp", cfg.parallel.tp))
        padded = cfg.model.padded_vocab_size(saved_tp)    # the embedding's global rows on disk
        if padded % tp:
            raise ValueError(f"{ckpt}: padded vocab {padded} (saved at tp={saved_tp}) is not "
                             f"divisible by the teacher's tp={tp}")
        # inference layout: this TP, one stage, no SP / recompute
        cfg.parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=1, vpp=None,
                                           sequence_parallel=False)
        cfg.train.recompute = None
        if precision is not None and precision != cfg.train.precision:
            cfg.train.precision, cfg.train.fp8 = precision, None
        cuda = torch.cuda.is_available()
        # The init is overwritten by the checkpoint; keep the caller's RNG streams untouched.
        # Megatron's TP RNG tracker must hold its streams (forward forks them even without
        # dropout): seeded here when the caller has not, restored when it has.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            tracker = tensor_parallel.get_cuda_rng_tracker()
            saved_states = tracker.get_states() if tracker.is_initialized() else None
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
            chunks = build_model(cfg, vocab_size=padded, pp_rank=0, pp_size=1)
            if saved_states is not None:
                tracker.set_states(saved_states)
        self.meta = load_model_weights(ckpt, chunks)
        self.model = chunks[0].eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cfg, self.checkpoint, self.config_path = cfg, ckpt, cfg_path
        self.device = (torch.device("cuda", torch.cuda.current_device()) if cuda
                       else torch.device("cpu"))
        self.vocab_size = int(cfg.model.vocab_size)
        self.padded_vocab_size = padded
        self.v_local = padded // tp
        self.tp_group = group                                       # size 1 at TP1: no collectives

    @torch.no_grad()
    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, T] -> [b, T, v_local] float32 (causal; positions 0..T-1)."""
        ids = input_ids.to(self.device)
        b, T = ids.shape
        pos = torch.arange(T, device=self.device).unsqueeze(0).expand(b, T)
        return self.model(ids, pos, None).float()                 # [b, T, v/tp]


@dataclass
class SampleTopK:
    """One sample's teacher top-K at pivot positions."""

    sample_id: int
    values: torch.Tensor        # [P, K] float32 (standardised logits), 0 where not aligned
    ids: torch.Tensor           # [P, K] int64 teacher ids
    aligned_mask: torch.Tensor  # [P] bool: aligned AND labels[t] is a response token
    n_response: int             # response positions (loss_mask = 1) among the P
    teacher_tokens: int
    teacher_ce: float = float("nan")  # mean NLL (nats/token) over the teacher's response tokens
    teacher_ce_tokens: int = 0        # teacher tokens (predicted, response) the mean is over


def teacher_inputs(sample, teacher_tokenizer, pivot_positions: int,
                   max_teacher_len: int | None = None, *, with_labels: bool = False):
    """Teacher ids/offsets for a pivot sample, cut where they stop mattering (causal model):
    after the last pivot position's context end, or at ``max_teacher_len``.

    ``with_labels``: also return the teacher's next-token labels and their response flags,
    ``labels[j] = ids[j + 1]`` for the n inputs (n - 1 of them, or n when the teacher token after
    the cut still ends inside the text the pivot's labels cover). The teacher CE is taken over
    the labels flagged as response: the gold response as far as the pivot's window reaches.
    """
    ids, offs, is_resp, _ = encode_segments(teacher_tokenizer, sample.segments)
    c_max = int(sample.offsets[pivot_positions - 1][1]) if pivot_positions else 0
    n = 0
    while n < len(ids) and offs[n][1] <= c_max:
        n += 1
    if max_teacher_len is not None:
        n = min(n, max_teacher_len)
    if not with_labels:
        return ids[:n], offs[:n]
    # the pivot's last label is token P (when the sample goes on past its P positions)
    l_max = (int(sample.offsets[pivot_positions][1]) if pivot_positions < len(sample.ids)
             else c_max)
    m = n + 1 if 0 < n < len(ids) and offs[n][1] <= l_max else n
    return ids[:n], offs[:n], ids[1:m], is_resp[1:m]


def align_sample(sample, t_ids, t_offs, pivot_tokenizer, teacher_tokenizer, pivot_positions: int,
                 method: str = "offset") -> list[int]:
    p_offs = sample.offsets[:pivot_positions].tolist()
    if method == "offset":
        return offset_alignment(p_offs, t_offs)
    if method == "mined":
        p_pieces = [pivot_tokenizer.id_to_piece(int(i)) for i in sample.ids[:pivot_positions]]
        return mined_alignment(p_pieces, [teacher_tokenizer.id_to_piece(int(i)) for i in t_ids])
    raise ValueError(f"alignment must be 'offset' or 'mined', got {method!r}")


def true_vocab_size(backend: TeacherBackend, tokenizer) -> int:
    """The vocabulary the teacher's statistics (mean / std / logsumexp) and top-K run over: the
    tokenizer's ids ``[0, tokenizer.vocab_size)``. Output rows past it (an HF embedding padded to
    a multiple of 64 or 128, Megatron's TP padding) are never a token and never enter the top-K."""
    n = int(tokenizer.vocab_size)
    if not 0 < n <= backend.vocab_size:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} has {n} ids, the "
                         f"model has {backend.vocab_size} output rows: not this model's tokenizer")
    return n


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """ONE device-to-host copy for several tensors (any devices, shapes, dtypes): packed into one
    float64 buffer, which holds fp32/bf16/fp16/fp64 values, bools and integers below 2^53 exactly
    (vocab ids, counts). Returns CPU tensors of the original shapes and dtypes."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors])       # [sum numel] on the device
    host = flat.cpu()                                                  # the one copy
    out, o = [], 0
    for t in tensors:
        out.append(host[o:o + t.numel()].view(t.shape).to(t.dtype))
        o += t.numel()
    return out


def compute_batch_topk(samples, backend: TeacherBackend, teacher_tokenizer, pivot_tokenizer,
                       seq_len: int, *, k: int, eps: float, alignment: str,
                       max_teacher_len: int | None) -> list[SampleTopK]:
    """Teacher forward on a right-padded batch, standardised top-K placed at pivot positions, and
    each sample's teacher CE on its own response tokens (``SampleTopK.teacher_ce``).

    Tokenisation and the alignment maps are host work; the forward, the top-K, the log-probs and
    the placement at pivot positions run on the logits' device, and the results come back to the
    host in ONE copy per batch (values, ids, masks and CE sums together)."""
    # the student's own functions (SPEC §2): top-K and vocab-parallel log-softmax
    from megatron_fusion.losses import standardized_topk, token_logprobs

    vocab = true_vocab_size(backend, teacher_tokenizer)
    prepared = []
    for s in samples:
        P = min(len(s.ids), seq_len)                       # pivot positions (tokens) of the sample
        t_ids, t_offs, t_labels, t_resp = teacher_inputs(s, teacher_tokenizer, P, max_teacher_len,
                                                         with_labels=True)
        align = align_sample(s, t_ids, t_offs, pivot_tokenizer, teacher_tokenizer, P, alignment)
        prepared.append((s, P, t_ids, (t_labels, t_resp), align))
    b, T = len(prepared), max(1, max(len(p[2]) for p in prepared))
    P_max = max(p[1] for p in prepared)
    pad = teacher_tokenizer.pad_id if teacher_tokenizer.pad_id is not None else (
        teacher_tokenizer.eos_id or 0)
    # host inputs, built from Python lists and moved to the device once each
    batch = torch.full((b, T), pad, dtype=torch.long)               # [b, T], right padding
    labels = torch.full((b, T), pad, dtype=torch.long)              # [b, T]: teacher token j+1
    ce_mask = torch.zeros(b, T, dtype=torch.bool)                   # j predicts a response token
    src = torch.full((b, P_max), -1, dtype=torch.long)              # [b, P]: teacher pos or -1
    resp = torch.zeros(b, P_max, dtype=torch.bool)                  # [b, P]: labels[t] is response
    for r, (s, P, t_ids, (t_labels, t_resp), align) in enumerate(prepared):
        batch[r, :len(t_ids)] = torch.as_tensor(t_ids, dtype=torch.long)
        labels[r, :len(t_labels)] = torch.as_tensor(t_labels, dtype=torch.long)
        ce_mask[r, :len(t_resp)] = torch.as_tensor(t_resp, dtype=torch.bool)
        src[r, :P] = torch.as_tensor(align, dtype=torch.long)
        nxt = torch.as_tensor(s.is_response[1:P + 1], dtype=torch.bool)
        resp[r, :len(nxt)] = nxt
    with torch.no_grad():
        logits = backend.local_logits(batch)                        # [b, T, v/tp] on the device
        dev = logits.device
        values, ids = standardized_topk(logits, k, eps=eps, vocab_size=vocab,
                                        tp_group=backend.tp_group)  # [b, T, K] x2
        logp = token_logprobs(logits, labels.to(dev, non_blocking=True), vocab_size=vocab,
                              tp_group=backend.tp_group)            # [b, T], same on all TP ranks
        del logits
        src_d, resp_d = src.to(dev, non_blocking=True), resp.to(dev, non_blocking=True)
        mask = (src_d >= 0) & resp_d                                # [b, P]: aligned AND response
        rows = src_d.clamp(min=0)[..., None].expand(-1, -1, k)      # [b, P, K]
        v = torch.where(mask[..., None], values.gather(1, rows).float(), 0.0)   # [b, P, K]
        i = torch.where(mask[..., None], ids.gather(1, rows), 0)                # [b, P, K]
        nll_sum = torch.where(ce_mask.to(dev, non_blocking=True), -logp.double(),
                              0.0).sum(-1)                          # [b]
        v, i, mask, nll_sum = to_host(v, i, mask, nll_sum)          # one copy per batch
    n_ce = ce_mask.sum(-1)                                          # [b] (host input)
    out = []
    for r, (s, P, t_ids, _, _) in enumerate(prepared):
        n = int(n_ce[r])
        ce = float(nll_sum[r]) / n if n else float("nan")
        out.append(SampleTopK(s.sample_id, v[r, :P], i[r, :P], mask[r, :P], int(resp[r].sum()),
                              len(t_ids), ce, n))
    return out


def shard_path(out_dir: str | Path, teacher: str, index: int) -> Path:
    return Path(out_dir) / f"{teacher}-{index:05d}.topk"


def precompute_teacher_topk(dataset: SFTDataset, teacher_tokenizer, backend: TeacherBackend,
                            out_dir: str | Path, *, teacher: str, k: int = 10,
                            alignment: str = "offset", eps: float = 1e-6,
                            dtype: str = "bfloat16", samples_per_shard: int = 256,
                            batch_size: int = 4, max_teacher_len: int | None = None,
                            threshold: float = 0.8, write: bool = True,
                            progress: bool = True) -> dict:
    """Write (or complete) the teacher's top-K shards for ``dataset``; return a summary dict.

    ``write``: whether this rank writes files (TP rank 0); all ranks of a TP group must call it.
    """
    out_dir = Path(out_dir)
    n = len(dataset)
    n_shards = -(-n // samples_per_shard)
    expected = {"teacher": teacher, "teacher_tokenizer_hash": teacher_tokenizer.content_hash,
                "pivot_tokenizer_hash": dataset.tokenizer.content_hash, "k": k,
                "dataset_hash": dataset.dataset_hash, "dtype": dtype}
    meta = {"alignment": alignment, "eps": eps, "seq_len": dataset.seq_len,
            "max_teacher_len": max_teacher_len}
    aligned = response = tokens = skipped = 0
    bar = None
    if progress and write:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"teacher {teacher}", unit="sample", dynamic_ncols=True)
    t0 = time.perf_counter()
    for si in range(n_shards):
        lo, hi = si * samples_per_shard, min(n, (si + 1) * samples_per_shard)
        path = shard_path(out_dir, teacher, si)
        done = _finished(path, expected, dataset.sample(lo).sample_id,
                         dataset.sample(hi - 1).sample_id + 1, meta)
        if done is not None:  # every rank sees the same file system, so all ranks skip it
            aligned += done["meta"]["aligned_positions"]
            response += done["meta"]["response_positions"]
            skipped += 1
            if bar:
                bar.update(hi - lo)
            continue
        writer = TopKWriter(path, TopKHeader(**{k_: v for k_, v in expected.items()},
                                             meta=dict(meta)))
        sh_aligned = sh_resp = 0
        for b0 in range(lo, hi, batch_size):
            samples = [dataset.sample(i) for i in range(b0, min(hi, b0 + batch_size))]
            for r in compute_batch_topk(samples, backend, teacher_tokenizer, dataset.tokenizer,
                                        dataset.seq_len, k=k, eps=eps, alignment=alignment,
                                        max_teacher_len=max_teacher_len):
                writer.add(r.sample_id, r.values, r.ids, r.aligned_mask, r.teacher_ce,
                           r.teacher_ce_tokens)
                sh_aligned += int(r.aligned_mask.sum())
                sh_resp += r.n_response
                tokens += r.teacher_tokens
            if bar:
                bar.update(len(samples))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}",
                                aligned=f"{(aligned + sh_aligned) / max(response + sh_resp, 1):.3f}")
        writer.header.meta.update(aligned_positions=sh_aligned, response_positions=sh_resp)
        if write:
            writer.close()
        else:
            writer.abort()
        aligned += sh_aligned
        response += sh_resp
    if bar:
        bar.close()
    fraction = aligned / response if response else 1.0
    if write:
        report_alignment(teacher, fraction, threshold)
    elapsed = time.perf_counter() - t0
    return {"teacher": teacher, "shards": n_shards, "skipped_shards": skipped,
            "aligned_fraction": fraction, "aligned_positions": aligned,
            "response_positions": response, "teacher_tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "paths": [str(shard_path(out_dir, teacher, i)) for i in range(n_shards)]}


def _finished(path: Path, expected: dict, first_id: int, end_id: int, meta: dict) -> dict | None:
    """The header of a finished shard for exactly this work, None when it must be (re)made."""
    if not path.exists():
        return None
    try:
        header = read_topk_header(path)
    except TopKStoreError as e:  # cannot come from our atomic writes; recompute, but say so
        warnings.warn(f"recomputing unusable shard: {e}")
        return None
    # a shard from another run (other teacher, data, K...) is a configuration error, not resume
    want = dict(expected, sample_id_start=first_id, sample_id_end=end_id)
    read_topk_header(path, want, verify=False)
    for key, v in meta.items():
        if header["meta"].get(key) != v:
            raise TopKStoreError(f"{path}: header field 'meta.{key}' is "
                                 f"{header['meta'].get(key)!r}, the run expects {v!r}")
    return header


def expected_header(dataset: SFTDataset, teacher: str, teacher_tokenizer, k: int = 10,
                    dtype: str = "bfloat16") -> dict:
    """The header fields a trainer should pass to ``TopKReader(expected=...)``."""
    return {"teacher": teacher, "teacher_tokenizer_hash": teacher_tokenizer.content_hash,
            "pivot_tokenizer_hash": dataset.tokenizer.content_hash, "k": k,
            "dataset_hash": dataset.dataset_hash, "dtype": dtype}


__all__ = ["TeacherBackend", "HFTeacherBackend", "VocabShardedBackend", "MegatronTeacherBackend",
           "precompute_teacher_topk",
           "compute_batch_topk", "expected_header", "shard_path", "aligned_fraction"]



MODEL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""``--dtype`` / ``TeacherConfig.dtype`` names -> the dtype a frozen model is loaded in."""


def rank_device(name: str | None = None) -> torch.device:
    """This rank's device for a frozen model: ``name`` "cuda" -> ``cuda:LOCAL_RANK``, "cuda:N",
    "cpu"; None -> "cuda" when CUDA is available, else cpu."""
    import os

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: must be cuda, cuda:N or cpu")
    return dev


def model_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``name`` in MODEL_DTYPES, or None / "auto": bf16 on CUDA, fp32 on CPU."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in MODEL_DTYPES:
        raise ValueError(f"--dtype {name}: must be one of auto, {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


@contextlib.contextmanager
def open_backend(kind: str, *, model_dir=None, gguf_file=None, checkpoint=None, tokenizer=None,
                 what: str = "teacher", device: str | torch.device | None = None,
                 dtype: str | None = None):
    """A frozen model for the precompute tools: yields ``(backend, tokenizer_spec, is_writer)``.

    ``kind="hf"``: a transformers model directory (or GGUF), one process, loaded in ``dtype``
    (``MODEL_DTYPES`` name; None/"auto": bf16 on CUDA, fp32 on CPU) onto ``device`` (None: this
    rank's, ``rank_device``). ``kind="megatron"``: a megatron-fusion run, TP over all ranks of the
    current (torchrun) world, on ``cuda:LOCAL_RANK`` when CUDA is available (else cpu/gloo), in
    the run's ``train.precision`` unless ``dtype`` is given; only rank 0 writes.
    Process groups this opened are torn down on exit.
    """
    own_dist = False
    try:
        dev = rank_device(str(device) if device is not None else None)
        if kind == "hf":
            if not model_dir:
                raise ValueError(f"--backend hf needs the {what} model directory")
            model_dir = Path(model_dir)
            spec = tokenizer or (model_dir / gguf_file if gguf_file else model_dir)
            yield (HFTeacherBackend(model_dir, gguf_file=gguf_file, device=dev,
                                    dtype=model_dtype(dtype, dev)), spec, True)
            return
        if not checkpoint:
            raise ValueError("--backend megatron needs --checkpoint RUN_DIR")
        if dev.type != ("cuda" if torch.cuda.is_available() else "cpu"):
            raise ValueError(f"--device {device}: --backend megatron runs on cuda:LOCAL_RANK when "
                             "CUDA is available and on cpu (gloo) only without it")
        if dtype not in (None, "auto"):
            model_dtype(dtype, dev)                           # validates the name
        import torch.distributed as dist

        from megatron_fusion.parallel import init_distributed, init_student_groups

        own_dist = not dist.is_initialized()
        init_distributed()
        init_student_groups(tp=dist.get_world_size())       # every rank: one TP group
        backend = MegatronTeacherBackend(checkpoint,
                                         precision=None if dtype in (None, "auto") else dtype)
        yield backend, tokenizer or backend.cfg.data.tokenizer, dist.get_rank() == 0
    finally:
        if own_dist:
            import torch.distributed as dist

            from megatron_fusion.parallel import destroy_student_groups

            destroy_student_groups()
            dist.destroy_process_group()


def add_backend_args(ap, what: str) -> None:
    """The frozen-model flags shared by tools/precompute_teacher_topk.py (``what="teacher"``) and
    tools/precompute_source_logprobs.py (``what="source"``); ``open_backend_from_args`` opens it."""
    ap.add_argument("--backend", choices=["hf", "megatron"], default="hf",
                    help=f"hf: a transformers model (--{what}-model); megatron: a megatron-fusion "
                    "run (--checkpoint), tensor-parallel over the torchrun ranks")
    ap.add_argument(f"--{what}-model", default=None, help="HF model directory (or the GGUF's)")
    ap.add_argument("--checkpoint", default=None,
                    help="--backend megatron: run dir (its latest checkpoint) or a checkpoint dir")
    ap.add_argument("--gguf-file", default=None, help=f"GGUF file name inside --{what}-model")
    ap.add_argument(f"--{what}-tokenizer", default=None,
                    help=f"{what} tokenizer (default: the model directory / its GGUF; for "
                    "--backend megatron the run's data.tokenizer)")
    ap.add_argument("--device", default=None,
                    help="cuda (= cuda:LOCAL_RANK), cuda:N or cpu; default: cuda when CUDA is "
                    "available, else cpu (--backend megatron: always that default)")
    ap.add_argument("--dtype", choices=["auto", *MODEL_DTYPES], default="auto",
                    help="dtype the model is loaded and run in; auto: hf bf16 on CUDA, fp32 on "
                    "CPU; megatron the run's train.precision")


def backend_info(backend) -> dict:
    """Where the frozen model runs, for the tools' printed summary: device and weights' dtype."""
    w = next(backend.model.parameters())
    return {"device": str(w.device), "model_dtype": str(w.dtype).removeprefix("torch.")}


def open_backend_from_args(args, what: str):
    """``open_backend`` for the flags of ``add_backend_args``."""
    return open_backend(args.backend, model_dir=getattr(args, f"{what}_model"),
                        gguf_file=args.gguf_file, checkpoint=args.checkpoint,
                        tokenizer=getattr(args, f"{what}_tokenizer"), what=what,
                        device=args.device, dtype=args.dtype)


def cli_main(argv=None) -> dict:
    """``tools/precompute_teacher_topk.py``: one teacher over one SFT file (see --help).

    ``--backend megatron``: run under ``torchrun --nproc-per-node TP`` (or plain python for TP1);
    all ranks form one teacher TP group, rank 0 writes and prints the summary.
    """
    import argparse
    import json

    from megatron_fusion.tokenizers import load_tokenizer

    ap = argparse.ArgumentParser(description="Precompute a teacher's standardised top-K at the "
                                 "pivot's response positions (SPEC §6 shards).")
    ap.add_argument("--data", required=True, help="SFT JSONL (prompt/response or messages)")
    ap.add_argument("--pivot-tokenizer", required=True, help="pivot tokenizer (.model, dir, .gguf)")
    add_backend_args(ap, "teacher")
    ap.add_argument("--teacher-name", required=True, help="teacher name as in the fusion config")
    ap.add_argument("--out", required=True, help="output directory for the shards")
    ap.add_argument("--seq-len", type=int, required=True, help="pivot sequence length")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--alignment", choices=["offset", "mined"], default="offset")
    ap.add_argument("--shard-dtype", choices=["bfloat16", "float16"], default="bfloat16",
                    help="dtype of the stored top-K values (the shard header's dtype)")
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--samples-per-shard", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-teacher-len", type=int, default=None)
    ap.add_argument("--overflow", choices=["truncate", "reject", "error"], default="truncate")
    ap.add_argument("--empty", choices=["skip", "reject"], default="skip")
    ap.add_argument("--cache-dir", default=None, help="tokenised-data cache directory")
    ap.add_argument("--threshold", type=float, default=0.8, help="warn under this aligned fraction")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        opened = open_backend_from_args(args, "teacher")
        backend, tok_spec, write = opened.__enter__()
    except ValueError as e:
        ap.error(str(e))
    try:
        teacher_tok = load_tokenizer(tok_spec, name=args.teacher_name)
        ds = SFTDataset(args.data, load_tokenizer(args.pivot_tokenizer), args.seq_len,
                        cache_dir=args.cache_dir, overflow=args.overflow, empty=args.empty)
        summary = precompute_teacher_topk(
            ds, teacher_tok, backend, args.out, teacher=args.teacher_name, k=args.k,
            alignment=args.alignment, eps=args.eps, dtype=args.shard_dtype,
            samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
            max_teacher_len=args.max_teacher_len, threshold=args.threshold, write=write,
            progress=not args.no_progress)
        summary["dataset_stats"] = ds.stats.as_dict()
        summary.update(backend_info(backend))
        if write:
            print(json.dumps({k: v for k, v in summary.items() if k != "paths"}, indent=1))
    finally:
        opened.__exit__(None, None, None)
    return summary
