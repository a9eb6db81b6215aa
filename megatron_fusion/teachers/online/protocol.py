"""The student <-> teacher message protocol of online teachers (package doc: the format).

Per micro-batch a header int64[8] ``[status, b, s, K, msg_len, fingerprint, teacher_tokens,
compute_us]``, then the teacher's top-K log-probs [b, s, K] as the uint16 codes of a format-4
shard (int16 bits, ``teachers.logprobs.encode_logprobs``), ids [b, s, K] int32, aligned [b, s]
uint8, teacher CE [b] float32 (nats per byte of response text, ``SampleTopK.teacher_ce_byte``,
as offline shards' ``teacher_ce_byte``: what minCE / avgCE compare), and ``(d, c)`` [b, s, 2]
float32 (``sigma + eps``, ``mu - logsumexp``): per aligned position the 68 B at K = 10 a
format-4 shard stores, decoded by the student as a shard is read (``decode_topk``); or
``status = ERROR`` and the teacher's one-line message. The
fingerprint names the micro-batch's sample ids, so a student never trains on another batch's
top-K. Host tensors: the bridge is a gloo group (methods.md §7).
"""

from __future__ import annotations

import hashlib

import torch

from megatron_fusion.config import Config
from megatron_fusion.errors import TeacherDataError
from megatron_fusion.teachers.logprobs import encode_logprobs


def batch_fingerprint(sample_ids: torch.Tensor) -> str:
    return hashlib.sha1(sample_ids.cpu().numpy().astype("<i8").tobytes()).hexdigest()[:16]


class TeacherFailedError(TeacherDataError):
    """An online teacher raised, died or timed out (one line naming it; user-facing)."""


OK, ERROR = 1, 2
HEADER = 8
EPS = 1e-6               # methods.md §2 default, as megatron-fusion precompute-topk and fuse.eps
ALIGNMENT = "offset"     # methods.md §1 default, as precompute-topk and fuse.alignment


def error_key(teacher: str) -> str:
    """Store key where a failing teacher rank posts its one-line error."""
    return f"error/{teacher}"


def fingerprint_to_int(fp: str) -> int:
    v = int(fp, 16)                                     # 64-bit fingerprint as a signed int64
    return v - (1 << 64) if v >= 1 << 63 else v


def int_to_fingerprint(v: int) -> str:
    return f"{v % (1 << 64):016x}"


def student_receivers(cfg: Config, dp: int, dp_rank: int) -> list[int]:
    """Launch ranks of the student's last pipeline stage for DP rank ``dp_rank`` (Megatron's
    order tp-cp-ep-dp-pp: rank = tp_rank + tp * dp_rank + tp * dp * pp_rank)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    return [t + tp * dp_rank + tp * dp * (pp - 1) for t in range(tp)]


def topk_message(res: list, sample_ids: list[int], seq: int, k: int, tokens: int, compute_s: float):
    """The OK message for the ``SampleTopK`` results ``res`` of one micro-batch (module doc);
    each result must carry its log-probs (``logp``, ``d``, ``c``: ``compute_batch_topk``)."""
    b = len(res)
    codes = torch.zeros(b, seq, k, dtype=torch.int16)                       # [b, s, K]
    ids = torch.zeros(b, seq, k, dtype=torch.int32)                         # [b, s, K]
    aligned = torch.zeros(b, seq, dtype=torch.uint8)                        # [b, s]
    dc = torch.zeros(b, seq, 2, dtype=torch.float32)                        # [b, s, (d, c)]
    for r, st in enumerate(res):
        if st.logp is None:
            raise ValueError(f"topk_message: sample {st.sample_id} has no teacher log-probs")
        n = min(st.ids.shape[0], seq)
        m = st.aligned_mask[:n].bool()
        codes[r, :n] = torch.where(m[:, None], encode_logprobs(st.logp[:n]), 0)
        ids[r, :n] = st.ids[:n].to(torch.int32)
        aligned[r, :n] = m.to(torch.uint8)
        dc[r, :n, 0] = torch.where(m, st.d[:n].float(), 0.0)
        dc[r, :n, 1] = torch.where(m, st.c[:n].float(), 0.0)
    ce = torch.tensor([st.teacher_ce_byte for st in res], dtype=torch.float32)   # [b] nats/byte
    fp = fingerprint_to_int(batch_fingerprint(torch.tensor(sample_ids)))
    header = torch.tensor([OK, b, seq, k, 0, fp, tokens, int(compute_s * 1e6)], dtype=torch.long)
    return [header, codes, ids, aligned, ce, dc]


def decode_topk(codes: torch.Tensor, ids: torch.Tensor, aligned: torch.Tensor, dc: torch.Tensor):
    """A received OK message's tensors -> (values [b,s,K] f32, ids [b,s,K] i64, aligned [b,s]
    bool, logp [b,s,K] f32), 0 where not aligned: the values a format-4 shard gives
    (``TopKReader.get``) for the same teacher results."""
    from megatron_fusion.teachers.logprobs import decode_logprobs, standardized_from_logprobs

    m = aligned.bool()
    logp = torch.where(m[..., None], decode_logprobs(codes), 0.0)
    d = torch.where(m, dc[..., 0], 1.0)                  # unaligned rows: no division by 0
    values = torch.where(m[..., None], standardized_from_logprobs(logp, d, dc[..., 1]), 0.0)
    return values, ids.long(), m, logp


def error_message(text: str) -> list[torch.Tensor]:
    body = torch.tensor(list(text.encode()[:4000]), dtype=torch.uint8)
    return [torch.tensor([ERROR, 0, 0, 0, body.numel(), 0, 0, 0], dtype=torch.long), body]
