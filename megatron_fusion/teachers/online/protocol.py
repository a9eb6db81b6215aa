"""The student <-> teacher message protocol of online teachers (package doc: the format).

Per micro-batch a header int64[8] ``[status, b, s, K, msg_len, fingerprint, teacher_tokens,
compute_us]``, then values [b, s, K] bf16 bits (int16), ids [b, s, K] int32, aligned [b, s]
uint8, teacher CE [b] float32 (nats per byte of response text, ``SampleTopK.teacher_ce_byte``,
as offline shards' ``teacher_ce_byte``: what minCE / avgCE compare); or ``status = ERROR`` and the teacher's one-line message. The
fingerprint names the micro-batch's sample ids, so a student never trains on another batch's
top-K. Host tensors: the bridge is a gloo group (methods.md §7).
"""

from __future__ import annotations

import hashlib

import torch

from megatron_fusion.config import Config
from megatron_fusion.errors import TeacherDataError


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
    b = len(res)
    values = torch.zeros(b, seq, k, dtype=torch.bfloat16)                  # [b, s, K]
    ids = torch.zeros(b, seq, k, dtype=torch.int32)                         # [b, s, K]
    aligned = torch.zeros(b, seq, dtype=torch.uint8)                        # [b, s]
    for r, st in enumerate(res):
        n = min(st.values.shape[0], seq)
        values[r, :n] = st.values[:n].to(torch.bfloat16)
        ids[r, :n] = st.ids[:n].to(torch.int32)
        aligned[r, :n] = st.aligned_mask[:n].to(torch.uint8)
    ce = torch.tensor([st.teacher_ce_byte for st in res], dtype=torch.float32)   # [b] nats/byte
    fp = fingerprint_to_int(batch_fingerprint(torch.tensor(sample_ids)))
    header = torch.tensor([OK, b, seq, k, 0, fp, tokens, int(compute_s * 1e6)], dtype=torch.long)
    return [header, values.view(torch.int16), ids, aligned, ce]


def error_message(text: str) -> list[torch.Tensor]:
    body = torch.tensor(list(text.encode()[:4000]), dtype=torch.uint8)
    return [torch.tensor([ERROR, 0, 0, 0, body.numel(), 0, 0, 0], dtype=torch.long), body]
