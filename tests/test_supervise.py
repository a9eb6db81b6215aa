"""megatron_fusion.supervise: failed launch ranks are named by their role (student / teacher)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_fusion.config import load_config
from megatron_fusion.supervise import describe, failure_report, rank_roles

REPO = Path(__file__).resolve().parents[1]


def _cfg(tp=2, pp=1, teachers=(("coder", 2, 2), ("chat", 1, 1))):
    online = ", ".join(f"{{name: {n}, source: online, ranks: {r}, tp: {t}, tokenizer: t{i}, "
                       f"checkpoint: c{i}}}" for i, (n, r, t) in enumerate(teachers))
    return load_config(None, ["stage=fuse", f"parallel.tp={tp}", f"parallel.pp={pp}",
                              f"fuse.teachers=[{online}, {{name: cached, topk_dir: d, "
                              "tokenizer: t}]"])


def test_online_teacher_ranks_are_counted_once_and_only_for_the_fuse_stage():
    cfg = _cfg(tp=2, pp=1)
    assert [t.name for t in cfg.online_teachers()] == ["coder", "chat"]
    assert cfg.online_teacher_ranks() == 3 and cfg.student_world_size(7) == 4
    assert rank_roles(cfg, 7)[4:] == ["teacher coder (tp rank 0 of replica 0)",
                                      "teacher coder (tp rank 1 of replica 0)",
                                      "teacher chat (tp rank 0 of replica 0)"]
    # the same teachers listed under another stage start no teacher ranks: every rank is the student's
    sft = load_config(None, ["stage=sft", "fuse.teachers=[{name: coder, source: online, ranks: 2, "
                             "tp: 2, tokenizer: t0, checkpoint: c0}]"])
    assert sft.online_teachers() == [] and sft.student_world_size(4) == 4
    assert all(r.startswith("student") for r in rank_roles(sft, 4))


def test_rank_roles_follow_megatron_order_then_teachers_in_config_order():
    # student tp2 x dp2 x pp2 = 8 ranks, then coder (2 ranks, tp2) and chat (1 rank)
    roles = rank_roles(_cfg(tp=2, pp=2), 11)
    assert len(roles) == 11
    assert roles[0] == "student (tp rank 0, dp rank 0, pp stage 0)"
    assert roles[3] == "student (tp rank 1, dp rank 1, pp stage 0)"
    assert roles[6] == "student (tp rank 0, dp rank 1, pp stage 1)"
    assert roles[8:] == ["teacher coder (tp rank 0 of replica 0)",
                         "teacher coder (tp rank 1 of replica 0)",
                         "teacher chat (tp rank 0 of replica 0)"]
    # an offline-only or non-fuse config: all ranks are the student
    assert all(r.startswith("student") for r in rank_roles(load_config(None, []), 2))


def test_describe_signals_and_exit_codes():
    roles = rank_roles(_cfg(), 5)
    assert describe(3, -9, roles) == ("teacher coder (launch rank 3: tp rank 1 of replica 0) "
                                      "was killed by SIGKILL (out of memory?)")
    assert describe(0, 1, roles) == ("student (launch rank 0: tp rank 0, dp rank 0, pp stage 0) "
                                     "exited with code 1")
    assert describe(4, -15, roles).endswith("was killed by SIGTERM")
    assert "outside the config's layout" in describe(9, 2, roles)


def test_failure_report_puts_the_root_cause_first():
    roles = rank_roles(_cfg(), 5)
    lines = failure_report({0: 1, 4: -9}, 4, roles)
    assert lines[0] == ("error: teacher chat (launch rank 4: tp rank 0 of replica 0) was killed "
                        "by SIGKILL (out of memory?); the student was stopped; its last "
                        "checkpoint is kept")
    assert lines[1].startswith("error: student (launch rank 0")
    # a student root cause does not claim a teacher stopped it
    assert failure_report({1: 1}, 1, roles) == [
        "error: student (launch rank 1: tp rank 1, dp rank 0, pp stage 0) exited with code 1"]


@pytest.mark.dist
def test_run_torchrun_names_the_dead_teacher_rank(tmp_path):
    """Real torchrun agent, 3 ranks (student tp2 + teacher chat, 1 rank): the teacher rank
    SIGKILLs itself, torchrun tears the others down, and the report names the teacher."""
    worker = tmp_path / "worker.py"
    worker.write_text("import os, signal, time\n"
                      "if os.environ['RANK'] == '2':\n"
                      "    time.sleep(1); os.kill(os.getpid(), signal.SIGKILL)\n"
                      "time.sleep(120)\n")
    script = ("import sys; from tests.test_supervise import _cfg; "
              "from megatron_fusion.supervise import run_torchrun; "
              "sys.exit(run_torchrun(sys.argv[1:], _cfg(teachers=[('chat', 1, 1)]), 3))")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", script, "--standalone", "--nproc-per-node=3",
                        "--monitor-interval=0.1", str(worker)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert ("error: teacher chat (launch rank 2: tp rank 0 of replica 0) was killed by SIGKILL"
            in p.stderr), p.stderr[-2000:]
    assert time.perf_counter() - t0 < 60        # torn down, not left sleeping 120 s
