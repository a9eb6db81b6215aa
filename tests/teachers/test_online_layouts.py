"""Online teachers in more layouts: each online run == an offline run over shards precomputed by
tools/precompute_teacher_topk.py (its ``cli_main``) from the same teachers, for 3 steps.

- ``dp2``: student DP2 (tp=1) + ``tm`` (Megatron, ranks=2, tp=1: two replicas, each serving one
  student DP rank) + ``th`` (HF Llama, ranks=1: one replica serving both DP ranks, its
  tokenizer taken from the model directory). Two online teachers, two tokenizers, at once.
- ``pp2``: student PP2 (tp=1) + ``tm`` (ranks=1): the teacher sends to the last stage only (a
  message for the first stage would never be received and the run would fail on its timeout),
  and ``teacher/*`` metrics logged by launch rank 0 (first stage) are the last stage's.

Each layout: identical top-K tensors handed to ``FuseStage`` (recorded by test_online.py's
``--dump``, the same torchrun script) and identical loss/total, ce, uld, gld at every step.
An HF teacher at tp=2 (full model on each rank, vocab-sharded logits) gives the full model's
top-K; a missing HF checkpoint is a config error naming the field. ~1-2 min on 2 cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import tests.teachers.test_online as test_online
from tests.teachers.test_online import (SEQ, _dumps, _make_teacher, _student_yaml, _torchrun,
                               assert_same_topk)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 3
LOSSES = ("loss/total", "loss/ce", "loss/uld", "loss/gld")


def _layout_yaml(path: Path, data: dict, run_dir: Path, teachers: list[dict],
                 parallel: dict) -> Path:
    """test_online's student recipe with any student layout and any list of teachers."""
    import yaml

    _student_yaml(path, data, run_dir, teachers[0], STEPS)
    cfg = yaml.safe_load(path.read_text())
    cfg["parallel"] = parallel
    cfg["fuse"]["teachers"] = teachers
    cfg["checkpoint"]["interval"] = 0          # no resume here: save only at the end
    path.write_text(yaml.safe_dump(cfg))
    return path


def _make_assets(rank, world, data, root):
    """Teachers ``tm`` (megatron-fusion run, byte-level BPE) and ``th`` (HF Llama dir holding its
    SentencePiece tokenizer) and both teachers' offline shards, precomputed at TP1."""
    import torch
    import transformers

    from megatron_fusion.cli import precompute_topk_main as cli_main
    from megatron_fusion.tokenizers import train_byte_bpe, train_sentencepiece

    root = Path(root)
    texts = [json.loads(line)["prompt"] + "\n" + json.loads(line)["response"]
             for line in Path(data["train"]).read_text().splitlines()]
    train_byte_bpe(texts, 400, root / "tm_tok")
    _make_teacher(rank, world, data, str(root), str(root / "tm_tok"))      # -> root/teacher
    th_tok = train_sentencepiece(texts, 600, root / "th" / "tokenizer.model", model_type="bpe")
    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(vocab_size=th_tok.vocab_size, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the logits: top-K far from ties
        model.lm_head.weight.mul_(20)
    model.save_pretrained(root / "th")
    common = ["--data", data["train"], "--pivot-tokenizer", data["pivot_tokenizer"],
              "--seq-len", str(SEQ), "--no-progress"]
    cli_main(["--backend", "megatron", "--checkpoint", str(root / "teacher"), "--teacher-name",
              "tm", "--teacher-tokenizer", str(root / "tm_tok"), "--out", str(root / "topk_tm"),
              *common])
    cli_main(["--backend", "hf", "--teacher-model", str(root / "th"), "--teacher-name", "th",
              "--out", str(root / "topk_th"), *common])
    return True


@pytest.fixture(scope="module")
def layouts(demo_data, tmp_path_factory):
    from megatron_fusion.local_ranks import run_on_ranks

    root = tmp_path_factory.mktemp("online_layouts")
    lines = Path(demo_data["train"]).read_text().splitlines()
    data = dict(demo_data, train=str(root / "train.jsonl"))
    Path(data["train"]).write_text("\n".join(lines[:24]) + "\n")   # 3 steps use 12 samples
    t0 = time.perf_counter()
    run_on_ranks(_make_assets, 1, (data, str(root)))
    times = {"setup_s": time.perf_counter() - t0}
    offline = {"tm": {"name": "tm", "tokenizer": str(root / "tm_tok"),
                      "topk_dir": str(root / "topk_tm")},
               "th": {"name": "th", "tokenizer": str(root / "th"),
                      "topk_dir": str(root / "topk_th")}}
    tm = {"name": "tm", "tokenizer": str(root / "tm_tok"), "source": "online",
          "backend": "megatron", "checkpoint": str(root / "teacher"), "tp": 1}
    th = {"name": "th", "source": "online", "backend": "hf", "checkpoint": str(root / "th"),
          "ranks": 1, "tp": 1}                          # tokenizer: the model dir's
    cases = {  # layout: (student parallel, student ranks, online teachers)
        "dp2": ({"tp": 1, "pp": 1}, 2, [dict(tm, ranks=2), th]),
        "pp2": ({"tp": 1, "pp": 2}, 2, [dict(tm, ranks=1)]),
    }
    runs = {}
    for layout, (parallel, student, online) in cases.items():
        for source, teachers in (("offline", [offline[t["name"]] for t in online]),
                                 ("online", online)):
            name = f"{layout}_{source}"
            cfg = _layout_yaml(root / f"{name}.yaml", data, root / name, teachers, parallel)
            nproc = student + sum(t.get("ranks", 0) for t in teachers)
            t0 = time.perf_counter()
            p = _torchrun(nproc, [test_online.__file__, "--dump", str(root / f"dump_{name}"),
                                  "--config", str(cfg)])
            times[f"{name}_s"] = time.perf_counter() - t0
            assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
            runs[name] = [json.loads(line) for line in (root / name / "metrics.jsonl").open()]
    print(json.dumps({k: round(v, 1) for k, v in times.items()}))
    return {"root": root, "runs": runs, "times": times, "data": data}


def _assert_same_losses(off_recs: list[dict], on_recs: list[dict], teachers: list[str],
                        rel: float = 0.0) -> None:
    """Equal losses at every step (``rel``: to that relative tolerance, for a batch-dependent
    teacher: ``test_online.assert_same_topk``)."""
    def series(recs):
        return {r["step"]: [r[k] for k in LOSSES] for r in recs if "loss/total" in r}

    off, on = series(off_recs), series(on_recs)
    assert sorted(off) == sorted(on) == list(range(1, STEPS + 1))
    assert all(v > 0 for v in off[1])
    if rel:
        assert all(on[s] == pytest.approx(off[s], rel=rel) for s in off), (on, off)
    else:
        assert on == off
    steps = [r for r in on_recs if "loss/total" in r]
    assert all(r["teacher/wait_s"] >= 0 for r in steps)
    assert all(r[f"teacher/{t}/tokens_per_s"] > 0 for r in steps for t in teachers)


def test_dp2_two_online_teachers_equal_offline(layouts):
    """Student DP2: tm's two replicas each serve one DP rank, th's one replica serves both; the
    HF teacher (its tokenizer from its model dir) and the Megatron teacher at once."""
    root = layouts["root"]
    off, on = _dumps(root / "dump_dp2_offline"), _dumps(root / "dump_dp2_online")
    # per DP rank: 3 steps x 1 micro-batch x 2 teachers (fetched tm, th per micro-batch)
    files = [f"rank{r}_{i:03d}.pt" for r in (0, 1) for i in range(1, 2 * STEPS + 1)]
    # th is an HF model on CPU: its logits depend on the batch at the last bit (see there)
    assert_same_topk(off, on, files, batch_dependent=("th",))
    _assert_same_losses(layouts["runs"]["dp2_offline"], layouts["runs"]["dp2_online"],
                        ["tm", "th"], rel=1e-5)


def test_pp2_online_teacher_sends_to_last_stage(layouts):
    """Student PP2: only the last stage (launch rank 1) fetches top-K; the teacher serves it, and
    the teacher metrics logged by rank 0 (first stage) are the last stage's (they were 0)."""
    root = layouts["root"]
    off, on = _dumps(root / "dump_pp2_offline"), _dumps(root / "dump_pp2_online")
    files = [f"rank1_{i:03d}.pt" for i in range(1, 2 * STEPS + 1)]  # 3 steps x 2 micro-batches
    assert_same_topk(off, on, files)
    _assert_same_losses(layouts["runs"]["pp2_offline"], layouts["runs"]["pp2_online"], ["tm"])


def _hf_tp2_ranks(rank, world, data, root):
    """``_build_backend`` of an HF teacher at tp=2 in a teacher group of 2 ranks: the full model on
    each rank, vocab-sharded logits; top-K against the full model's on the same samples."""
    import torch

    from megatron_fusion.config import TeacherConfig
    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.teachers.online.protocol import ALIGNMENT, EPS
    from megatron_fusion.teachers.online.server import build_backend
    from megatron_fusion.parallel import init_student_groups
    from megatron_fusion.teachers.backends import VocabShardedBackend
    from megatron_fusion.teachers.topk import compute_batch_topk
    from megatron_fusion.tokenizers import load_tokenizer

    groups = init_student_groups(tp=2)
    t = TeacherConfig(name="th", source="online", backend="hf", checkpoint=f"{root}/th", ranks=2,
                      tp=2)
    backend, tok_spec = build_backend(t, groups)
    assert isinstance(backend, VocabShardedBackend) and backend.tp_group is groups.tp
    assert tok_spec == f"{root}/th"                              # the model dir's tokenizer
    pivot, teacher_tok = load_tokenizer(data["pivot_tokenizer"]), load_tokenizer(tok_spec)
    ds = SFTDataset(data["train"], pivot, SEQ)
    samples = [ds.sample(i) for i in range(len(ds))]
    kw = dict(k=10, eps=EPS, alignment=ALIGNMENT, max_teacher_len=None)
    sharded = compute_batch_topk(samples, backend, teacher_tok, pivot, SEQ, **kw)
    full = compute_batch_topk(samples, backend.full, teacher_tok, pivot, SEQ, **kw)
    for a, b in zip(sharded, full):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.aligned_mask, b.aligned_mask)
        # z-score statistics from per-shard partial sums: equal up to fp32 rounding
        assert torch.allclose(a.values, b.values, rtol=1e-5, atol=1e-5)
        assert torch.allclose(torch.tensor(a.teacher_ce), torch.tensor(b.teacher_ce), rtol=1e-5,
                              equal_nan=True)                # NaN without a response token
    return backend.v_local, sum(int(a.aligned_mask.sum()) for a in sharded)


def test_hf_online_teacher_at_tp2_shards_the_vocab(layouts):
    from megatron_fusion.local_ranks import run_on_ranks

    out = run_on_ranks(_hf_tp2_ranks, 2, (layouts["data"], str(layouts["root"])))
    assert out[0] == out[1] and out[0][1] > 100, out


def test_hf_online_teacher_without_checkpoint_is_a_config_error(tmp_path):
    from megatron_fusion.config import ConfigError, TeacherConfig
    from megatron_fusion.teachers.online.server import build_backend

    for ckpt, why in ((None, "must be set"), (str(tmp_path / "none"), "not found")):
        t = TeacherConfig(name="th", source="online", backend="hf", checkpoint=ckpt, ranks=1)
        with pytest.raises(ConfigError, match=f"teacher th.checkpoint: .*{why}"):
            build_backend(t, groups=None)
