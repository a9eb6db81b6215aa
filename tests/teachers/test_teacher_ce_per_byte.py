"""minCE / avgCE compare teachers per byte of response text, not per teacher token.

Two teachers read the same text with very different tokenizers (one token per character, one
per word) and assign it the same total log-likelihood; their per-token CEs differ by the
tokens-per-text ratio, their per-byte CEs do not, so the fuse stage gives them equal weights.
The same number reaches the weighting through an offline shard and through the online wire.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_fusion.config import FuseConfig, TeacherConfig
from megatron_fusion.data.sft import encode_segments
from megatron_fusion.stages.fuse import FuseStage
from megatron_fusion.teachers.offline import OfflineTeacher
from megatron_fusion.teachers.online.protocol import topk_message
from megatron_fusion.teachers.shards import TopKHeader, TopKWriter
from megatron_fusion.teachers.topk import compute_batch_topk, covered_bytes

SEGMENTS = [("Question: what is 12 plus 30? ", False),
            ("The answer is forty-two, naïvely ½ of 84.", True)]
TOTAL_NLL = 37.5          # nats over the response, the same for both teachers
V = 400


class _Tok:
    """A tokenizer that tiles the text with ``pattern`` matches (ids from a char hash)."""

    bos_id = eos_id = None
    pad_id = 0
    vocab_size = V

    def __init__(self, pattern: str, name: str):
        self.pattern, self.name, self.content_hash = re.compile(pattern), name, name

    def encode_with_offsets(self, text):
        spans = [(m.start(), m.end()) for m in self.pattern.finditer(text)]
        ids = [1 + sum(map(ord, text[a:b])) % (V - 1) for a, b in spans]
        return ids, spans

    def id_to_piece(self, i):
        return str(i)


CHARS = _Tok(r"(?s).", "chars")            # one token per character
WORDS = _Tok(r"\S+\s*|\s+", "words")       # one token per word (with its trailing space)


class _Backend:
    """Logits whose log-prob of the next token is ``-nll`` at every position (labels known from
    the inputs: the whole sample fits, so label j is input j + 1)."""

    tp_group = None
    vocab_size = V

    def __init__(self, nll: float):
        self.nll = nll

    def local_logits(self, batch):
        b, t = batch.shape
        # p(label) = e^x / (e^x + V - 1) = e^-nll  <=>  x = log((V - 1) / (e^nll - 1))
        x = math.log((V - 1) / math.expm1(self.nll))
        z = torch.zeros(b, t, V, dtype=torch.float64)
        z[:, :-1].scatter_(2, batch[:, 1:, None], x)
        return z


def _pivot_sample():
    ids, offs, is_resp, text = encode_segments(CHARS, SEGMENTS)
    return SimpleNamespace(sample_id=7, text=text, ids=np.array(ids), offsets=np.array(offs),
                           is_response=np.array(is_resp), segments=SEGMENTS)


def _teacher_result(tok):
    s = _pivot_sample()
    _, _, is_resp, _ = encode_segments(tok, SEGMENTS)
    n_resp = sum(is_resp[1:])                     # response tokens the teacher predicts
    (res,) = compute_batch_topk([s], _Backend(TOTAL_NLL / n_resp), tok, CHARS, 128, k=4,
                                eps=1e-6, alignment="offset", max_teacher_len=None)
    return res, n_resp


def _shard_ce(tmp_path, name, res):
    d = tmp_path / name
    with TopKWriter(d / f"{name}-00000.topk", TopKHeader(teacher=name, teacher_tokenizer_hash=name,
                                                         pivot_tokenizer_hash="p", k=4,
                                                         dataset_hash="d")) as w:
        w.add(res.sample_id, res.values, res.ids, res.aligned_mask, res.teacher_ce,
              res.teacher_ce_tokens, res.teacher_ce_byte, res.teacher_ce_bytes)
    return OfflineTeacher(name, str(d), {"teacher": name}).fetch(torch.tensor([7]), 128)[3]


def _weights(mode, ces):
    stage = object.__new__(FuseStage)             # only what _weights reads
    stage.f = FuseConfig(teachers=[TeacherConfig(name="a"), TeacherConfig(name="b")],
                         weighting=mode)
    stage.teachers = [None, None]
    batch = {"tokens": torch.zeros(1, 4), "sample_id": torch.tensor([7]),   # one sample
             "teachers": [{"ce": c} for c in ces]}
    return stage._weights(batch)


def test_covered_bytes_counts_utf8_once():
    text = "aé½b"
    assert covered_bytes(text, [(0, 1), (1, 2), (1, 2), (2, 3)], [True, True, True, False]) == 3
    assert covered_bytes(text, [(0, 4)], [True]) == len(text.encode())


@pytest.mark.parametrize("mode", ["minCE", "avgCE"])
def test_same_text_same_likelihood_gets_equal_weights(tmp_path, mode):
    (ra, na), (rb, nb) = _teacher_result(CHARS), _teacher_result(WORDS)
    assert na > 4 * nb                                   # very different tokenisations ...
    for r, n in ((ra, na), (rb, nb)):                    # ... of the same total likelihood
        assert r.teacher_ce_tokens == n
        assert abs(r.teacher_ce * n - TOTAL_NLL) < 1e-6 * TOTAL_NLL
    assert ra.teacher_ce < rb.teacher_ce / 4             # per token the finer one looks better
    resp_bytes = len(SEGMENTS[1][0].encode())
    assert ra.teacher_ce_bytes == rb.teacher_ce_bytes == resp_bytes > len(SEGMENTS[1][0])
    assert abs(ra.teacher_ce_byte - TOTAL_NLL / resp_bytes) < 1e-9
    # offline (shard) and online (wire) carry the same per-byte number for the weighting
    off = [_shard_ce(tmp_path, n, r) for n, r in (("a", ra), ("b", rb))]
    on = [topk_message([r], [7], 128, 4, 0, 0.0)[4] for r in (ra, rb)]
    for x, y in zip(off, on):
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)
    for ces in (off, on):
        w = _weights(mode, ces)
        assert torch.allclose(w, torch.full_like(w, 0.5), atol=1e-6), w
    # the per-token CE (the old comparison) would not give equal weights
    w_tok = _weights(mode, [torch.tensor([ra.teacher_ce]), torch.tensor([rb.teacher_ce])])
    assert (w_tok[0] - w_tok[1]).abs().item() > 0.1
