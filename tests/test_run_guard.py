"""``megatron_fusion.run_guard``: ranks (and their children) die with their launcher, and a second
run on a run.dir that a live run holds refuses to start.

Process trees are stand-ins: a "launcher" process that exports ``MEGATRON_FUSION_PARENT_PID`` and
starts a "rank", which calls ``die_with_parent()`` and starts children the way dist_checkpointing
does (a fork-context writer that forks again, a spawn-context worker, a ``Manager()`` server);
then the launcher is SIGKILLed and no process of the tree may be left within a few seconds.

    .venv/bin/python -m pytest -q tests/test_run_guard.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_fusion import run_guard
from megatron_fusion.errors import UserError
from megatron_fusion.run_guard import RunDirBusyError, RunDirLock, RunDirLostError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG and /proc are Linux")

RANK = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from megatron_fusion import run_guard

    def sleeper():
        time.sleep(120)

    def forking_writer(out):                 # like write_preloaded_data_multiproc: forks again
        p = mp.get_context("fork").Process(target=sleeper)
        p.start()
        with open(out, "a") as f:
            f.write(f"{p.pid}\\n")
        time.sleep(120)

    if __name__ == "__main__":
        out = sys.argv[1]
        if sys.argv[2] == "guard":
            run_guard.die_with_parent()
        pids = [os.getpid()]
        fork = mp.get_context("fork").Process(target=forking_writer, args=(out + ".grand",))
        fork.start()
        spawn = mp.get_context("spawn").Process(target=sleeper)
        spawn.start()
        manager = mp.get_context("spawn").Manager()      # dist_checkpointing's results queue
        queue = manager.Queue()
        pids += [fork.pid, spawn.pid, manager._process.pid]
        while not os.path.exists(out + ".grand"):
            time.sleep(0.05)
        with open(out + ".tmp", "w") as f:
            f.write(" ".join(map(str, pids)))
        os.replace(out + ".tmp", out)
        time.sleep(120)
""")

LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    from megatron_fusion import run_guard
    os.environ[run_guard.PARENT_PID_ENV] = str(os.getpid())    # what supervise.run_torchrun does
    subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]])
    time.sleep(120)
""")


def _env():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead: it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _tree(tmp_path: Path, mode: str):
    """Start launcher -> rank -> children; return (launcher Popen, rank and descendant pids)."""
    rank, launcher = tmp_path / "rank.py", tmp_path / "launcher.py"
    rank.write_text(RANK)
    launcher.write_text(LAUNCHER)
    out = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, str(launcher), str(rank), str(out), mode],
                            env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not out.exists():
        assert proc.poll() is None, "the launcher exited early"
        assert time.monotonic() < deadline, "the rank never reported its children"
        time.sleep(0.1)
    pids = [int(p) for p in out.read_text().split()]
    pids += [int(p) for p in (tmp_path / "pids.grand").read_text().split()]
    assert len(pids) == 5 and all(_alive(p) for p in pids)
    return proc, pids


def _wait_dead(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_sigkill_of_the_launcher_kills_the_rank_and_all_its_children(tmp_path):
    proc, pids = _tree(tmp_path, "guard")
    proc.kill()                                               # SIGKILL the launcher
    proc.wait()
    left = _wait_dead(pids)
    for p in left:                                            # do not leak them if we fail
        os.kill(p, signal.SIGKILL)
    assert left == [], f"still running after the launcher's SIGKILL: {left} of {pids}"


def test_without_the_guard_the_tree_outlives_the_launcher(tmp_path):
    """The control: the same tree without die_with_parent() keeps running (the orphans the
    guard is for), so the test above does detect them."""
    proc, pids = _tree(tmp_path, "none")
    proc.kill()
    proc.wait()
    time.sleep(2.0)
    try:
        assert all(_alive(p) for p in pids)
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_rank_whose_parent_is_already_gone_kills_itself(tmp_path):
    """The parent can die before the prctl: then our parent is not the launcher the environment
    names, and die_with_parent() kills us at once."""
    code = "from megatron_fusion import run_guard; run_guard.die_with_parent(); print('alive')"
    not_parent = subprocess.Popen(["sleep", "30"])
    try:
        env = {**_env(), run_guard.PARENT_PID_ENV: str(not_parent.pid)}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == -signal.SIGKILL and "alive" not in r.stdout
        env[run_guard.PARENT_PID_ENV] = str(os.getpid())      # the real parent: it lives
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "alive", r.stderr
    finally:
        not_parent.kill()
        not_parent.wait()


# --- the run.dir lock ------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from megatron_fusion.run_guard import RunDirLock
    lock = RunDirLock(sys.argv[1], heartbeat_s=0.2, stale_after_s=30)
    print("held", flush=True)
    time.sleep(120)
""")


def test_second_run_refuses_naming_the_first_then_takes_over_once_it_is_dead(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError) as e:
            RunDirLock(run_dir)
        msg = str(e.value)
        assert isinstance(e.value, UserError) and "\n" not in msg
        assert f"{socket.gethostname()} pid {holder.pid}" in msg and str(run_dir) in msg
        # its heartbeat thread keeps the lock fresh
        m0 = (run_dir / "run.lock").stat().st_mtime
        time.sleep(0.8)
        assert (run_dir / "run.lock").stat().st_mtime > m0
    finally:
        holder.kill()
        holder.wait()
    # the holder crashed (dead pid on this host): its lock is stale at once, not after 30 s
    lock = RunDirLock(run_dir)
    try:
        assert lock.taken_over["pid"] == holder.pid
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run_dir / "run.lock").exists()
    assert [p.name for p in run_dir.iterdir()] == []          # no temp or aside files left


def _foreign_lock(run_dir: Path, age_s: float, **extra):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    path.write_text(json.dumps({"host": "gpu-b07", "pid": 4242, "token": "theirs", **extra}))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_lock_of_another_host_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    _foreign_lock(tmp_path, age_s=5)
    with pytest.raises(RunDirBusyError, match=r"in use by a live run \(gpu-b07 pid 4242, heartbeat "
                                              r"5 s ago\)"):
        RunDirLock(tmp_path, heartbeat_s=1, stale_after_s=60)
    _foreign_lock(tmp_path, age_s=61)
    with RunDirLock(tmp_path, heartbeat_s=1, stale_after_s=60) as lock:
        assert lock.taken_over["host"] == "gpu-b07"
    assert not (tmp_path / "run.lock").exists()


def test_a_requeued_slurm_job_takes_over_its_earlier_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    _foreign_lock(tmp_path, age_s=1, slurm_job="777", slurm_attempt="2")   # same attempt: live
    with pytest.raises(RunDirBusyError):
        RunDirLock(tmp_path)
    _foreign_lock(tmp_path, age_s=1, slurm_job="777", slurm_attempt="1")   # the earlier one
    with RunDirLock(tmp_path) as lock:
        assert lock.taken_over["slurm_attempt"] == "1"
    _foreign_lock(tmp_path, age_s=1, slurm_job="778", slurm_attempt="1")   # another job
    with pytest.raises(RunDirBusyError):
        RunDirLock(tmp_path)


def test_heartbeat_raises_once_another_run_took_the_lock(tmp_path):
    lock = RunDirLock(tmp_path, heartbeat_s=60, stale_after_s=120)
    lock.heartbeat()                                          # ours: fine
    _foreign_lock(tmp_path, age_s=0)                          # another run took it over
    with pytest.raises(RunDirLostError, match="taken over by gpu-b07 pid 4242"):
        lock.heartbeat()
    lock.release()
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == "theirs"   # not ours


CONTENDER = textwrap.dedent("""
    import sys, time
    from megatron_fusion.run_guard import RunDirBusyError, RunDirLock
    while time.time() < float(sys.argv[2]):
        pass
    try:
        lock = RunDirLock(sys.argv[1])
    except RunDirBusyError:
        print("busy", flush=True)
    else:
        print("held", flush=True)
        time.sleep(120)
""")


def test_concurrent_starts_exactly_one_wins(tmp_path):
    start = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path / "run"), start],
                              env=_env(), stdout=subprocess.PIPE, text=True) for _ in range(6)]
    try:
        outs = [p.stdout.readline().strip() for p in procs]   # the holder stays alive meanwhile
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sorted(outs) == ["busy"] * 5 + ["held"], outs


def test_bad_arguments():
    with pytest.raises(ValueError, match="heartbeat_s < stale_after_s"):
        RunDirLock("/nonexistent/never", heartbeat_s=10, stale_after_s=5)
