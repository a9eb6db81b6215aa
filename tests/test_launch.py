"""Launch scripts: syntax, the rendered srun/torchrun lines, W&B run id, and the requeue path.

Slurm's commands are replaced by small fakes on PATH (scontrol, scancel, srun) that record how
they were called, so the batch scripts run unchanged on a machine without Slurm.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_fusion import launcher
from megatron_fusion.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))

FAKE_SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-a01\\ngpu-a02\\ngpu-a03\\ngpu-a04\\n'; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_LOG"
kill -USR1 "$(cat "$FAKE_SRUN_PID")"      # the ranks save and stop: the fake srun exits
"""
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
trap 'echo "srun stopped" >> "$FAKE_LOG"; exit 0' USR1
echo $$ > "$FAKE_SRUN_PID"
while true; do sleep 0.05; done
"""


@pytest.fixture
def slurm_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "WANDB_", "MASTER_")) and k not in
           ("NODES", "TEACHER_NODES", "CONFIG", "STAGE", "RUN_DIR", "GPUS_PER_NODE", "DRY_RUN")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=sys.executable, LOG_ROOT=str(tmp_path / "logs"),
               FAKE_LOG=str(tmp_path / "calls.log"), FAKE_SRUN_PID=str(tmp_path / "srun.pid"),
               SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu-a[01-04]",
               SLURM_JOB_NAME="fuse14b", SLURM_SUBMIT_DIR=str(REPO))
    return env


def run_script(script, env, *args, timeout=60):
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def lines_starting(out: str, prefix: str) -> list[list[str]]:
    return [shlex.split(line[len(prefix):]) for line in out.splitlines() if line.startswith(prefix)]


def test_every_launch_script_parses():
    assert {p.name for p in SCRIPTS} >= {"fuse_14b.sh", "fpo_14b.sh", "run_local.sh", "common.sh"}
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"


def test_fuse_14b_renders_srun_and_torchrun(slurm_env):
    env = {**slurm_env, "DRY_RUN": "1", "NODES": "4", "TEACHER_NODES": "2", "SLURM_RESTART_COUNT": "1",
           "WANDB_PROJECT": "fusion-prod", "WANDB_ENTITY": "lab"}
    r = run_script("fuse_14b.sh", env, "run.dir=/scratch/runs/f14", "train.steps=50")
    assert r.returncode == 0, r.stderr
    log_dir = f"{slurm_env['LOG_ROOT']}/fuse14b-4242/attempt-1"
    assert lines_starting(r.stdout, "+ ")[0] == ["mkdir", "-p", log_dir]
    (srun,) = [c for c in lines_starting(r.stdout, "+ ") if c[0] == "srun"]
    assert {"--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            f"--output={log_dir}/node-%n.log"} <= set(srun)
    assert srun[srun.index("-m") + 1:] == ["megatron_fusion.launcher", "torchrun", "--",
                                           "run.dir=/scratch/runs/f14", "train.steps=50"]
    (torchrun,) = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("torchrun ")]
    assert torchrun[:8] == ["torchrun", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                            "--rdzv-endpoint=gpu-a01:24242", "--rdzv-id=4242", "--max-restarts=0",
                            f"--log-dir={log_dir}/torchrun"]
    cmd = torchrun[torchrun.index("-m"):]
    assert cmd[:4] == ["-m", "megatron_fusion.train", "--config", "configs/recipes/fuse_14b.yaml"]
    overrides = cmd[4:]
    assert overrides[-2:] == ["run.dir=/scratch/runs/f14", "train.steps=50"]
    assert {"stage=fuse", "logging.wandb_mode=online", "logging.wandb_project=fusion-prod",
            "logging.wandb_entity=lab"} <= set(overrides)
    teacher = {o.split("=")[0]: int(o.split("=")[1]) for o in overrides if o.startswith("fuse.teachers.")}
    assert teacher == {"fuse.teachers.0.ranks": 4, "fuse.teachers.1.ranks": 4, "fuse.teachers.2.ranks": 8}
    # what the trainer will load is a valid 32-rank layout with the teachers on the last 2 nodes
    cfg = load_config(REPO / "configs/recipes/fuse_14b.yaml", overrides)
    assert cfg.validate_layout(32) == 4 and cfg.student_world_size(32) == 16
    assert cfg.run.dir == "/scratch/runs/f14"
    exports = dict(line[len("export "):].split("=", 1) for line in r.stdout.splitlines()
                   if line.startswith("export "))
    assert exports["WANDB_RESUME"] == "allow"
    assert exports["WANDB_RUN_ID"] == launcher.wandb_run_id("/scratch/runs/f14", "fuse-phi4-14b")
    assert "scontrol requeue" not in r.stdout


def test_usr1_in_dry_run_requeues_the_job(slurm_env):
    r = run_script("fuse_14b.sh", {**slurm_env, "DRY_RUN": "1", "DRY_RUN_SIGNAL": "USR1"})
    assert r.returncode == 0, r.stderr
    calls = lines_starting(r.stdout, "+ ")
    assert ["scancel", "--signal=USR1", "4242"] in calls
    assert calls[-1] == ["scontrol", "requeue", "4242"]
    assert calls.index(["scancel", "--signal=USR1", "4242"]) < len(calls) - 1


def test_usr1_stops_the_ranks_then_requeues(slurm_env):
    """Not a dry run: the batch script starts (fake) srun, gets USR1 the way `--signal=B:USR1@300`
    delivers it, forwards it to the job steps, waits for them, then requeues and exits 0."""
    env = {**slurm_env, "NODES": "4", "TEACHER_NODES": "2"}
    proc = subprocess.Popen(["bash", str(REPO / "launch/fuse_14b.sh"), "train.steps=5"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = Path(env["FAKE_SRUN_PID"])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "srun never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    calls = Path(env["FAKE_LOG"]).read_text().splitlines()
    assert calls[0].startswith("srun --nodes=4 --ntasks-per-node=1")
    assert calls[1:] == ["scancel --signal=USR1 4242", "srun stopped", "scontrol requeue 4242"]
    assert "requeued; the next attempt resumes" in out
    assert (Path(env["LOG_ROOT"]) / "fuse14b-4242/attempt-0").is_dir()


def test_fpo_14b_gives_every_node_to_the_student(slurm_env):
    env = {**slurm_env, "DRY_RUN": "1", "SLURM_JOB_NAME": "fpo14b", "SLURM_JOB_NUM_NODES": "2", "NODES": "2"}
    r = run_script("fpo_14b.sh", env)
    assert r.returncode == 0, r.stderr
    (torchrun,) = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("torchrun ")]
    assert "--nnodes=2" in torchrun and "--config" in torchrun
    assert torchrun[torchrun.index("--config") + 1] == "configs/recipes/fpo_14b.yaml"
    assert "stage=fpo" in torchrun and not any(a.startswith("fuse.teachers.") for a in torchrun)


def test_node_count_must_match_the_allocation(slurm_env):
    r = run_script("fuse_14b.sh", {**slurm_env, "DRY_RUN": "1", "NODES": "8"})
    assert r.returncode == 2
    assert "NODES=8 but the allocation has 4 nodes" in r.stderr


def test_bad_teacher_nodes_is_a_one_line_error(slurm_env):
    r = run_script("fuse_14b.sh", {**slurm_env, "DRY_RUN": "1", "TEACHER_NODES": "4"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["config error: --teacher-nodes: 4 must be in [0, nodes=4)"]


def test_run_local_is_standalone(slurm_env):
    env = {**slurm_env, "DRY_RUN": "1", "GPUS_PER_NODE": "8", "CONFIG": "configs/recipes/fpo_14b.yaml",
           "RUN_DIR": "runs/local"}
    r = run_script("run_local.sh", env, "train.steps=3")
    assert r.returncode == 0, r.stderr
    (torchrun,) = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("torchrun ")]
    assert torchrun[:4] == ["torchrun", "--nnodes=1", "--nproc-per-node=8", "--standalone"]
    assert not any(a.startswith("--rdzv") for a in torchrun)
    assert torchrun[-2:] == ["run.dir=runs/local", "train.steps=3"]


def test_wandb_run_id_survives_requeues_and_differs_per_run_dir():
    base = {"CONFIG": "configs/recipes/fuse_14b.yaml", "NODES": "4", "GPUS_PER_NODE": "8", "TEACHER_NODES": "2",
            "MASTER_ADDR": "gpu-a01", "MASTER_PORT": "24242", "RUN_DIR": "/scratch/runs/a"}
    first = launcher.render({**base, "SLURM_JOB_ID": "100", "SLURM_RESTART_COUNT": "0"}, [])
    requeued = launcher.render({**base, "SLURM_JOB_ID": "100", "SLURM_RESTART_COUNT": "3"}, [])
    resubmitted = launcher.render({**base, "SLURM_JOB_ID": "171"}, [])
    other = launcher.render({**base, "RUN_DIR": "/scratch/runs/b"}, [])
    assert first.env["WANDB_RUN_ID"] == requeued.env["WANDB_RUN_ID"] == resubmitted.env["WANDB_RUN_ID"]
    assert other.env["WANDB_RUN_ID"] != first.env["WANDB_RUN_ID"]
    assert launcher.render({**base, "WANDB_RUN_ID": "mine"}, []).env["WANDB_RUN_ID"] == "mine"
    # an explicit per-teacher override after TEACHER_NODES' split wins
    node = launcher.render(base, ["fuse.teachers.2.ranks=8"])
    assert node.argv[-1] == "fuse.teachers.2.ranks=8"
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launcher.render({k: v for k, v in base.items() if k != "MASTER_ADDR"}, [])
    with pytest.raises(ConfigError, match="parallel.tp"):
        launcher.render(base, ["parallel.tp=4"])


@pytest.mark.dist
def test_run_local_trains_for_real_on_cpu(slurm_env, demo_data, tmp_path):
    """Not a dry run: run_local.sh -> `python -m megatron_fusion.launcher torchrun` (torchrun's agent
    in-process) -> 2 gloo ranks train 2 steps with W&B offline under the launcher's run id."""
    from tests.helpers.trainer_ranks import tiny_overrides

    run_dir = tmp_path / "run"
    over = [o for o in tiny_overrides(demo_data, str(run_dir)) if not o.startswith("logging.wandb")]
    env = {**slurm_env, "GPUS_PER_NODE": "2", "CONFIG": "configs/test/tiny_cpu.yaml",
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "RUN_NAME": "local-smoke-7"}
    r = run_script("run_local.sh", env, *over, "train.steps=2", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").open()
             if "loss/total" in x]
    assert steps == [1, 2]
    want_id = launcher.wandb_run_id(str(run_dir), "local-smoke-7")
    assert (run_dir / "wandb_id").read_text().strip() == want_id
    (log,) = (run_dir / "wandb").glob(f"offline-run-*-{want_id}/run-{want_id}.wandb")
    # the run record (protobuf in W&B's log format) carries the name and the full config
    raw = log.read_bytes()
    for needle in (b"local-smoke-7", b"global_batch", b"lambda_uld", str(run_dir).encode()):
        assert needle in raw, needle


def test_dockerfile_matches_the_repo():
    """No Docker engine here, so the image is not built in the suite; this keeps the Dockerfile
    from drifting: same megatron-core pin as constraints.txt, every runtime directory copied and
    not excluded from the build context, and the entry points it smoke-tests exist."""
    import re

    text = (REPO / "Dockerfile").read_text()
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    pin = re.search(r"^megatron-core==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    assert pin and f'"megatron-core=={pin.group(1)}"' in text
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_TAG\}-py3$", text, re.M)
    copied = set(re.findall(r"^COPY (\S+?)/? ", text, re.M))
    for need in ("setup.py", "megatron_fusion", "configs", "launch", "tools"):
        assert need in copied, need
        assert need not in ignored, need
    assert (REPO / "configs/recipes/fuse_14b.yaml").exists()
    assert "-c /tmp/image-constraints.txt" in text       # the image's torch/TE are never replaced
