"""FPO stage end to end on CPU: 5-step trajectories equal across TP1, TP2, PP2, DP2 (and gradient
accumulation) from one init, resume reads the stored reference back, and source log-prob files
that do not fit the run (or malformed preference lines) fail with one line before step 1.

    .venv/bin/python -m pytest -q tests/stages/test_fpo_stage.py

Source log-probs here are SYNTHETIC: ``SourceLogprobStore`` files written directly with the header
fields the run checks (``dataset_hash`` = sha256 of the preference file, ``source_tokenizer_hash``
of the source's own tokenizer) and per-pair numbers drawn around the random pivot's ℓ ≈ -log(V),
so with ``ref_offset = 1`` some values are clipped at both boundaries and max-margin picks both
sources. Scoring with real models is tested in tests/teachers/test_teacher_topk.py (the tool); this file
tests the trainer side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_fusion.local_ranks import run_on_ranks
from tests.helpers import trainer_ranks as tr

pytestmark = [pytest.mark.dist, pytest.mark.slow]
KEYS = ("fpo/loss", "rewards/chosen", "rewards/rejected", "fpo/margin", "fpo/clip_fraction",
        "fpo/selected/sA")


def write_source(path, name: str, tok_hash: str, data_hash: str, sample_ids, seed: int, drop=()):
    from megatron_fusion.teachers.shards import LogprobHeader, SourceLogprobStore

    rng = np.random.default_rng(seed)
    recs = []
    for sid in sample_ids:
        nw, nl = 4 + sid % 5, 3 + sid % 4
        lw, ll = -6.2 + 1.5 * rng.standard_normal(), -6.4 + 1.5 * rng.standard_normal()
        if sid not in drop:
            recs.append((sid, lw * nw, nw, ll * nl, nl))
    SourceLogprobStore.write(path, LogprobHeader(source=name, source_tokenizer_hash=tok_hash,
                                                 dataset_hash=data_hash), recs)
    return str(path)


@pytest.fixture(scope="module")
def fpo_data(demo_data, tmp_path_factory):
    from megatron_fusion.data.jsonl import sha256_file, write_jsonl
    from megatron_fusion.data.synthetic import preference_pairs
    from megatron_fusion.tokenizers import load_tokenizer, train_sentencepiece

    d = tmp_path_factory.mktemp("fpo_data")
    train = demo_data["preference"]
    valid = d / "valid_preference.jsonl"
    write_jsonl(valid, preference_pairs(16, 4242))
    pivot = load_tokenizer(demo_data["pivot_tokenizer"])
    texts = [json.loads(x)["prompt"] + "\n" + json.loads(x)["chosen"] for x in open(train)]
    src_b = train_sentencepiece(texts, 600, d / "sB.model", model_type="bpe", name="sB")
    ids = list(range(sum(1 for x in open(train) if x.strip())))
    h = sha256_file(train)
    a = write_source(d / "sA.logp", "sA", pivot.content_hash, h, ids, 1)   # sA shares the pivot's
    b = write_source(d / "sB.logp", "sB", src_b.content_hash, h, ids, 2)
    other = write_source(d / "other.logp", "sA", pivot.content_hash,
                         sha256_file(demo_data["train"]), ids, 1)          # another data file
    holes = write_source(d / "holes.logp", "sA", pivot.content_hash, h, ids, 1, drop={7})
    bad = d / "bad_preference.jsonl"
    lines = open(train).read().splitlines()
    lines[2] = json.dumps({"prompt": "2+2?", "chosen": "4"})               # no 'rejected'
    bad.write_text("\n".join(lines) + "\n")
    return {"train": train, "valid": str(valid), "sources": [a, b],
            "source_tokenizers": [demo_data["pivot_tokenizer"], str(d / "sB.model")],
            "other": other, "holes": holes, "bad": str(bad), "dir": str(d)}


@pytest.fixture(scope="module")
def traj(demo_data, fpo_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fpo_layouts"))
    one = run_on_ranks(tr.fpo_layouts, 1, (demo_data, fpo_data, root, [
        ("tp1", [f"fpo.valid_preference={fpo_data['valid']}"]),
        ("accum", ["train.micro_batch=1"]),          # 4 micro-batches of 1 pair
        ("resumed", ["resume:3"]),                   # 3 steps, then resume to 5
    ], 5, True), timeout_s=600)[0]
    two = run_on_ranks(tr.fpo_layouts, 2, (demo_data, fpo_data, root, [
        ("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"]), ("dp2", []),
    ]), timeout_s=600)[0]
    return {**one, **two, "root": root}


def _series(recs, key):
    return [r[key] for r in recs["metrics"] if key in r and r.get("step", 0) > 0][:5]


# Rewards and margin are β·(ℓ_θ − fused) and their difference: small differences of O(6) log-probs.
# fp32 noise of the logits (layout-dependent summation order) is relative to ℓ, so these are
# compared relative to the size of the terms, β·|ℓ| ≈ 2.5·6.2, not to the small difference.
SCALE = {"rewards/chosen": 15.0, "rewards/rejected": 15.0, "fpo/margin": 30.0}


def _close(name, got, ref, tol=1e-5):
    for key in KEYS:
        a, b = _series(got, key), _series(ref, key)
        assert len(b) == 5 and len(a) == 5, (name, key, a, b)
        for step, (x, y) in enumerate(zip(a, b), 1):
            scale = max(abs(y), SCALE.get(key, 1e-6))
            assert abs(x - y) <= tol * scale, f"{name} {key} step {step}: {x} vs {y}"


def test_fpo_terms_are_active(traj):
    ref = traj["tp1"]
    loss = _series(ref, "fpo/loss")
    assert loss[0] > 0.0 and loss[-1] < loss[0]           # preference loss goes down
    clip = _series(ref, "fpo/clip_fraction")
    assert 0.0 < clip[0] < 1.0                            # clipping active, not everywhere
    sel = [a + b for a, b in zip(_series(ref, "fpo/selected/sA"), _series(ref, "fpo/selected/sB"))]
    assert all(abs(s - 1.0) < 1e-9 for s in sel)          # max-margin picks one source per pair
    # the reference pass was stored in the SourceLogprobStore format
    from megatron_fusion.teachers.shards import SourceLogprobStore

    store = SourceLogprobStore(Path(traj["root"]) / "tp1" / "ref_logprobs")
    assert store.header["source"] == "pivot_ref" and len(store) > 0
    ev = [r for r in ref["metrics"] if "eval/pref_accuracy" in r]
    assert len(ev) >= 2 and all(0.0 <= r["eval/pref_accuracy"] <= 1.0 for r in ev)


@pytest.mark.parametrize("name", ["tp2", "pp2", "dp2", "accum"])
def test_fpo_trajectory_matches_tp1(traj, name):
    _close(name, traj[name], traj["tp1"])


def test_fpo_resume_reads_reference_and_continues(traj):
    ref, res = traj["tp1"], traj["resumed"]
    assert res["summary"]["start_step"] == 3
    for key in KEYS:  # steps 4, 5 after the resume == the uninterrupted run, bit for bit
        assert _series(res, key)[3:] == _series(ref, key)[3:], key


def test_fpo_inputs_that_do_not_fit_fail_before_step_1(demo_data, fpo_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fpo_err"))
    a, b = fpo_data["sources"]
    toks = fpo_data["source_tokenizers"]
    msgs = run_on_ranks(tr.fpo_errors, 1, (demo_data, fpo_data, root, [
        ("malformed", [f"data.train={fpo_data['bad']}"]),
        ("other_dataset", ["fpo.sources_logprobs=" + json.dumps([fpo_data["other"], b])]),
        ("other_tokenizer", ["fpo.source_tokenizers=" + json.dumps([toks[0], toks[0]])]),
        ("missing_pair", ["fpo.sources_logprobs=" + json.dumps([fpo_data["holes"], b])]),
        ("missing_file", ["fpo.sources_logprobs=" + json.dumps([a, f"{root}/nowhere.logp"])]),
    ]))[0]
    assert "JSONLError" in msgs["malformed"] and f"{fpo_data['bad']}:3" in msgs["malformed"]
    assert "other.logp" in msgs["other_dataset"] and "dataset_hash" in msgs["other_dataset"]
    assert "sB.logp" in msgs["other_tokenizer"] and "source_tokenizer_hash" in msgs["other_tokenizer"]
    assert "holes.logp" in msgs["missing_pair"] and "sample id 7" in msgs["missing_pair"]
    assert "nowhere.logp" in msgs["missing_file"] and "not found" in msgs["missing_file"]
    for name, msg in msgs.items():
        assert msg is not None and "\n" not in msg, (name, msg)
        assert not (Path(root) / name / "checkpoints").exists()  # nothing trained or saved
