"""What the fuse stage checks about offline teachers before step 1 (no ranks needed):
the teacher tokenizer hash always (or a one-line error saying the tokenizer is missing), the
shards' eps / alignment against fuse.eps / fuse.alignment, and the aligned fraction the shards
record against fuse.min_aligned_fraction (warn) and fuse.min_aligned_fraction_hard (stop)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from megatron_fusion.config import Config, ConfigError, FuseConfig, TeacherConfig
from megatron_fusion.errors import TeacherDataError
from megatron_fusion.stages.fuse import FuseStage
from megatron_fusion.teachers.online.server import AlignmentWatch
from megatron_fusion.teachers.shards import TopKHeader, TopKWriter
from megatron_fusion.tokenizers import train_byte_bpe

K = 4
GROUPS = SimpleNamespace(tp=None, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [f"sample {i}: the answer is {i * 7} and not {i + 3}" for i in range(50)]
    return str(d / "t0_tok"), train_byte_bpe(texts, 300, d / "t0_tok")


def _shards(d, tok_hash, *, aligned=90, response=100, **meta):
    meta = {"eps": 1e-6, "alignment": "offset", "aligned_positions": aligned,
            "response_positions": response, **meta}
    d.mkdir(parents=True, exist_ok=True)
    with TopKWriter(d / "t0-00000.topk", TopKHeader(teacher="t0", teacher_tokenizer_hash=tok_hash,
                                                    pivot_tokenizer_hash="p", k=K,
                                                    dataset_hash="d", meta=meta)) as w:
        w.add(0, torch.ones(8, K), torch.zeros(8, K, dtype=torch.long),
              torch.ones(8, dtype=torch.bool))
    return str(d)


def _stage(topk_dir, tokenizer="", **fuse):
    cfg = Config(stage="fuse", fuse=FuseConfig(
        teachers=[TeacherConfig(name="t0", tokenizer=tokenizer, topk_dir=topk_dir)], k=K, **fuse))
    return FuseStage(cfg, 64, GROUPS)


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # any warning fails
        return fn()


def test_good_shards_pass_without_warning(tmp_path, tok):
    path, t = tok
    stage = _quiet(lambda: _stage(_shards(tmp_path / "a", t.content_hash), path))
    assert stage.teachers[0].name == "t0"


def test_teacher_tokenizer_hash_is_checked(tmp_path, tok):
    path, _ = tok
    with pytest.raises(TeacherDataError, match=r"teacher t0: .*t0-00000\.topk: header field "
                                               r"'teacher_tokenizer_hash'"):
        _stage(_shards(tmp_path / "a", "another-tokenizer"), path)


def test_no_teacher_tokenizer_is_a_one_line_error_not_a_skipped_check(tmp_path, tok):
    _, t = tok
    with pytest.raises(ConfigError, match=r"teacher t0\.tokenizer: must be set: the shards in "
                                          rf".* record teacher tokenizer hash {t.content_hash}") as e:
        _stage(_shards(tmp_path / "a", t.content_hash))
    assert "\n" not in str(e.value)


def test_synthetic_shards_say_what_is_not_checked(tmp_path):
    d = _shards(tmp_path / "a", "synthetic:t0", synthetic=True)
    with pytest.warns(UserWarning, match="synthetic top-K shards .* not checked"):
        _stage(d)


@pytest.mark.parametrize("field,meta,fuse", [
    ("meta.eps", {"eps": 1e-5}, {}),
    ("meta.alignment", {"alignment": "mined"}, {}),
    ("meta.eps", {}, {"eps": 1e-4}),                    # the run's value, not a constant
])
def test_shards_made_with_another_eps_or_alignment_are_refused(tmp_path, tok, field, meta, fuse):
    path, t = tok
    with pytest.raises(TeacherDataError, match=rf"teacher t0: .*t0-00000\.topk: header field "
                                               rf"'{field}'"):
        _stage(_shards(tmp_path / "a", t.content_hash, **meta), path, **fuse)


def test_low_aligned_fraction_warns(tmp_path, tok):
    path, t = tok
    d = _shards(tmp_path / "a", t.content_hash, aligned=50, response=100)
    with pytest.warns(UserWarning, match=r"teacher t0: 50\.0% of pivot response positions aligned"
                                         r".*under fuse\.min_aligned_fraction=0\.8"):
        _stage(d, path)
    _quiet(lambda: _stage(d, path, min_aligned_fraction=0.5))     # at the threshold: fine


def test_aligned_fraction_under_the_floor_stops_naming_the_teacher(tmp_path, tok):
    path, t = tok
    d = _shards(tmp_path / "a", t.content_hash, aligned=10, response=100)
    with pytest.raises(TeacherDataError, match=r"teacher t0: 10\.0% .* under "
                                               r"fuse\.min_aligned_fraction_hard=0\.2"):
        _stage(d, path)
    with pytest.warns(UserWarning):                               # floor 0: warn only
        _stage(d, path, min_aligned_fraction_hard=0.0)


def test_floor_above_the_warning_threshold_is_a_config_error():
    with pytest.raises(ConfigError, match="fuse.min_aligned_fraction_hard"):
        FuseConfig(min_aligned_fraction=0.5, min_aligned_fraction_hard=0.6)


def _results(aligned, response):
    return [SimpleNamespace(aligned_mask=torch.arange(response) < aligned, n_response=response)]


def test_online_teacher_watch_warns_once_then_stops():
    w = AlignmentWatch("tOn", 0.8, 0.2)
    w.add(_results(9, 10))
    assert _quiet(w.check) == pytest.approx(0.9)
    w.add(_results(1, 10))                                        # 10/20 = 50%
    with pytest.warns(UserWarning, match=r"teacher tOn: 50\.0% .*over the 2 samples it computed"):
        w.check()
    w.add(_results(5, 10))
    assert _quiet(w.check) == pytest.approx(0.5)                  # warned once
    w.add(_results(0, 60))                                        # 15/90 < 20%
    with pytest.raises(TeacherDataError, match=r"teacher tOn: 16\.7% .*min_aligned_fraction_hard"):
        w.check()
