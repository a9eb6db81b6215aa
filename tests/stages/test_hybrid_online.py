"""``fuse.loss: hybrid`` with an online teacher == the same teacher offline, for 5 steps.

One gloo launch makes the teacher (a tiny megatron-fusion run with its own byte-level BPE,
tests/teachers/test_online.py's ``_make_teacher``), precomputes its top-K shards (format 4: with
log-probs) through the CLI, and trains the offline student (TP1, hybrid with the tail bucket and
GLD). One torchrun launch then trains the same student against the teacher running online
(1 student rank + 1 teacher rank). Their loss trajectories must be identical: the online wire
carries what a format-4 shard stores, decoded the same way, and both runs build the same
vocabulary match from the same tokenizers. ~1 min on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.teachers.test_online import SEQ, _make_teacher, _student_yaml, _torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 5
KEYS = ("loss/total", "loss/ce", "loss/hybrid", "loss/matched", "loss/unmatched", "loss/tail",
        "loss/gld", "teacher/tm/matched_mass")


def _yaml(path: Path, data: dict, run_dir: Path, teacher: dict) -> Path:
    import yaml

    _student_yaml(path, data, run_dir, teacher, STEPS)
    cfg = yaml.safe_load(path.read_text())
    cfg["parallel"] = {"tp": 1}
    cfg["checkpoint"]["interval"] = 0
    cfg["fuse"].update(loss="hybrid", tail_bucket=True, timeout_s=120)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _teacher_shards_and_offline_run(rank, world, data, root, tok_dir, offline_yaml):
    from megatron_fusion.cli import precompute_topk_main
    from megatron_fusion.config import load_config
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    _make_teacher(rank, world, data, root, tok_dir)                      # -> root/teacher
    destroy_student_groups()
    precompute_topk_main(["--backend", "megatron", "--checkpoint", f"{root}/teacher",
                          "--teacher-name", "tm", "--teacher-tokenizer", tok_dir,
                          "--out", f"{root}/topk", "--data", data["train"],
                          "--pivot-tokenizer", data["pivot_tokenizer"], "--seq-len", str(SEQ),
                          "--no-progress"])
    destroy_student_groups()
    train(load_config(offline_yaml))
    return True


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    from megatron_fusion.local_ranks import run_on_ranks
    from megatron_fusion.tokenizers import train_byte_bpe

    root = tmp_path_factory.mktemp("hybrid_online")
    lines = Path(demo_data["train"]).read_text().splitlines()
    data = dict(demo_data, train=str(root / "train.jsonl"))
    Path(data["train"]).write_text("\n".join(lines[:24]) + "\n")    # 5 steps x 4 samples
    texts = [json.loads(line)["prompt"] + "\n" + json.loads(line)["response"] for line in lines]
    tok_dir = root / "teacher_tok"
    train_byte_bpe(texts, 400, tok_dir)
    offline = _yaml(root / "offline.yaml", data, root / "offline",
                    {"name": "tm", "tokenizer": str(tok_dir), "topk_dir": str(root / "topk")})
    online = _yaml(root / "online.yaml", data, root / "online",
                   {"name": "tm", "tokenizer": str(tok_dir), "source": "online",
                    "backend": "megatron", "checkpoint": str(root / "teacher"), "ranks": 1,
                    "tp": 1})
    run_on_ranks(_teacher_shards_and_offline_run, 1,
                 (data, str(root), str(tok_dir), str(offline)), timeout_s=600)
    p = _torchrun(2, ["-m", "megatron_fusion.train", "--config", str(online)])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return {name: [json.loads(line) for line in (root / name / "metrics.jsonl").open()]
            for name in ("offline", "online")}


def test_online_hybrid_trajectory_equals_offline(runs):
    def series(recs):
        return {r["step"]: [r[k] for k in KEYS] for r in recs if "loss/total" in r}

    off, on = series(runs["offline"]), series(runs["online"])
    assert sorted(off) == sorted(on) == list(range(1, STEPS + 1))
    hyb, matched, unmatched, mass = (off[1][KEYS.index(k)] for k in
                                     ("loss/hybrid", "loss/matched", "loss/unmatched",
                                      "teacher/tm/matched_mass"))
    assert hyb > 0 and matched > 0 and unmatched > 0 and 0 < mass < 1, off[1]
    assert on == off
    # the online run did receive its teacher over the wire (waits are logged per step)
    assert sum("teacher/wait_s" in r for r in runs["online"]) == STEPS
    assert not any("teacher/wait_s" in r for r in runs["offline"])
