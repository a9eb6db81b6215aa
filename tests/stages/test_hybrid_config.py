"""``fuse.loss: hybrid`` settings (no ranks needed): the config keys parse and bad values are one
line naming the field; the stage builds each teacher's vocabulary match once and caches it
(``<run.dir>/vocab_match/<name>.vmap`` or ``teachers[].vocab_match``), refuses a cache made
for other tokenizers naming the file, and refuses teacher data without log-probs or with ids
outside the teacher's vocabulary, naming the teacher."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_fusion.config import ConfigError, load_config
from megatron_fusion.errors import TeacherDataError
from megatron_fusion.stages.fuse import FuseStage
from megatron_fusion.teachers.vocab_match import VocabMatch, VocabMatchError
from megatron_fusion.tokenizers import train_byte_bpe, train_sentencepiece

GROUPS = SimpleNamespace(tp=None, dp=None, device=torch.device("cpu"), is_last_stage=True)
TEXTS = [f"sample {i}: the answer is {i * 7} and not {i + 3}" for i in range(60)]


def _cfg(*extra, teacher_tok="t.model"):
    teachers = [{"name": "t0", "tokenizer": teacher_tok}]
    return load_config(None, ["stage=fuse", "fuse.teachers=" + json.dumps(teachers), "fuse.k=4",
                              *extra])


def test_hybrid_keys_parse():
    f = _cfg("fuse.loss=hybrid", "fuse.tail_bucket=true", "fuse.lambda_matched=adaptive",
             "fuse.lambda_unmatched=adaptive").fuse
    assert (f.loss, f.tail_bucket, f.lambda_matched, f.lambda_unmatched) == \
        ("hybrid", True, "adaptive", "adaptive")
    f = _cfg("fuse.loss=hybrid", "fuse.lambda_matched=1", "fuse.lambda_unmatched=0.25").fuse
    assert (f.lambda_matched, f.lambda_unmatched) == (1.0, 0.25)
    assert isinstance(f.lambda_matched, float)
    f = _cfg().fuse
    assert (f.loss, f.tail_bucket, f.lambda_matched) == ("uld", False, 1.0)   # the paper's


@pytest.mark.parametrize("extra,field", [
    (["fuse.loss=kl"], "fuse.loss"),
    (["fuse.loss=hybrid", "fuse.lambda_matched=-1"], "fuse.lambda_matched"),
    (["fuse.loss=hybrid", "fuse.lambda_matched=lots"], "fuse.lambda_matched"),
    (["fuse.loss=hybrid", "fuse.lambda_matched=adaptive"], "fuse.lambda_unmatched"),
    (["fuse.loss=hybrid", "fuse.tail_bucket=maybe"], "fuse.tail_bucket"),
    (["fuse.tail_bucket=true"], "fuse.tail_bucket"),                     # uld has no tail
    (["fuse.loss=hybrid", "fuse.temperature=2.0"], "fuse.temperature"),
])
def test_bad_hybrid_settings_name_the_field(extra, field):
    with pytest.raises(ConfigError) as e:
        _cfg(*extra)
    assert e.value.field_name == field and "\n" not in str(e.value), str(e.value)


def test_hybrid_needs_each_teacher_tokenizer():
    with pytest.raises(ConfigError, match=r"teacher t0\.tokenizer: must be set for "
                                          r"fuse\.loss=hybrid"):
        _cfg("fuse.loss=hybrid", teacher_tok="")


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    train_sentencepiece(TEXTS, 400, d / "t.model", model_type="bpe")
    train_byte_bpe(TEXTS, 300, d / "pivot")
    train_byte_bpe(TEXTS[:30], 280, d / "other")
    from megatron_fusion.tokenizers import load_tokenizer

    return {k: (str(p), load_tokenizer(p)) for k, p in
            (("teacher", d / "t.model"), ("pivot", d / "pivot"), ("other", d / "other"))}


class _NoLogprobTeacher:
    name = "t0"

    def __init__(self, k, logp=True, bad_id=False, vocab=100_000):
        self.k, self.logp, self.bad_id, self.vocab = k, logp, bad_id, vocab

    def fetch(self, sample_ids, seq):
        b = len(sample_ids)
        ids = torch.arange(self.k).expand(b, seq, self.k).clone()
        if self.bad_id:
            ids[0, 1, 0] = self.vocab + 5
        out = (torch.zeros(b, seq, self.k), ids, torch.ones(b, seq, dtype=torch.bool),
               torch.zeros(b))
        return out + (torch.full((b, seq, self.k), -3.0),) if self.logp else out


def _stage(toks, tmp_path, teacher, *extra):
    cfg = _cfg("fuse.loss=hybrid", f"run.dir={tmp_path}", "model.seq_length=8",
               teacher_tok=toks["teacher"][0], *extra)
    return FuseStage(cfg, toks["pivot"][1].vocab_size, GROUPS, teachers=[teacher],
                     tokenizer=toks["pivot"][1])


def test_vocab_match_is_built_once_and_cached(toks, tmp_path):
    stage = _stage(toks, tmp_path, _NoLogprobTeacher(4))
    path = tmp_path / "vocab_match" / "t0.vmap"
    want = VocabMatch.build(toks["teacher"][1], toks["pivot"][1])
    assert path.exists() and stage.matches[0].n_matched == want.n_matched > 10
    assert torch.equal(stage.matches[0].pivot_ids, want.pivot_ids)
    assert stage.hybrid_w == [(1.0, 1.0)]
    mtime = path.stat().st_mtime_ns
    again = _stage(toks, tmp_path, _NoLogprobTeacher(4), "fuse.lambda_matched=adaptive",
                   "fuse.lambda_unmatched=adaptive")
    assert path.stat().st_mtime_ns == mtime                    # read back, not rebuilt
    frac = want.n_matched / toks["teacher"][1].vocab_size
    assert again.hybrid_w == [pytest.approx((frac, 1 - frac))]  # GOLD's rule


def test_cache_for_other_tokenizers_is_refused_naming_the_file(toks, tmp_path):
    stale = tmp_path / "stale.vmap"
    VocabMatch.build(toks["teacher"][1], toks["other"][1]).save(stale)
    with pytest.raises(VocabMatchError, match=r"stale\.vmap: header field 'pivot_tokenizer_hash'"):
        _stage(toks, tmp_path, _NoLogprobTeacher(4), f"fuse.teachers.0.vocab_match={stale}")


@pytest.mark.parametrize("teacher,msg", [
    (_NoLogprobTeacher(4, logp=False), r"teacher t0: no teacher log-probs"),
    (_NoLogprobTeacher(4, bad_id=True), r"teacher t0: top-K ids outside its vocabulary of "
                                        r"329 \(the vocabulary match's teacher tokenizer\)"),
])
def test_bad_teacher_data_is_one_line_naming_the_teacher(toks, tmp_path, teacher, msg):
    stage = _stage(toks, tmp_path, teacher)
    assert stage.matches[0].teacher_vocab_size == toks["teacher"][1].vocab_size == 329
    mb = {"tokens": torch.zeros(2, 8, dtype=torch.long), "loss_mask": torch.ones(2, 8),
          "sample_id": torch.tensor([1, 2])}
    with pytest.raises(TeacherDataError, match=msg) as e:
        stage.prepare_step([mb], GROUPS)
    assert "\n" not in str(e.value)
