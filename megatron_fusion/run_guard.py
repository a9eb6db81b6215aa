"""Runs that end with their launcher, and one live run per ``run.dir``.

Two failure modes of a killed launch (``megatron-fusion train`` runs torchrun's agent in-process,
``megatron_fusion.supervise``): SIGKILL of the launcher leaves every trainer rank, and each rank's
checkpoint workers, running as orphans; and a relaunch into the same ``run.dir`` then races
them (two writers of one checkpoint directory). This module answers both, standard library only.

``die_with_parent()``, first thing in a rank: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux), so
the kernel kills the rank when the process that started it dies; then a check that the parent is
still the one we were started by (``MEGATRON_FUSION_PARENT_PID``, set by the launcher before it
starts the ranks): a parent that died before the prctl leaves us re-parented, and we kill
ourselves. The death signal is not inherited across ``fork``, so it also installs the same guard
in every child the rank starts through Python:

- ``fork`` children (``os.fork``, multiprocessing's fork context: dist_checkpointing's
  ``FileSystemWriterAsync.write_preloaded_data_multiproc`` forks one writer per bucket on every
  save, ``TemporalAsyncCaller`` forks the async save): ``os.register_at_fork`` runs the guard in
  the child, against the pid that forked it.
- ``spawn`` / ``forkserver`` children (a fresh interpreter: ``_get_write_results_queue``'s
  ``Manager()`` server, started on the first save and alive until the rank exits;
  ``PersistentAsyncCaller``'s worker): the parent's multiprocessing config, which every child
  ``Process`` carries and unpickles first thing, holds a token whose unpickling runs the guard
  in the child, against the pid that pickled it (and installs these hooks there in turn).

Not covered: ``subprocess`` children (``fork_exec`` runs no Python hook in the child); none is
started by a rank today. The kernel's "parent" is the *thread* that forked: a child forked from a
thread that exits before the process does is killed then (every fork above is made by the main
thread of its process).

``RunDirLock(run_dir)``, rank 0, before the run's first write: an atomically created lock file
``<run_dir>/run.lock`` holding the holder's host, pid and start time; a daemon thread touches it
every ``heartbeat_s``. A second run on the same dir refuses to start (``RunDirBusyError``, a
``UserError`` naming the holder) while the holder is alive; a lock whose heartbeat is older than
``stale_after_s``, or whose holder is a dead process on this host, or an earlier attempt of this
Slurm job (a requeue), is stale and taken over, so a crashed run never blocks its own resume.
``heartbeat()`` (per step) raises ``RunDirLostError`` if another run took the lock meanwhile.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

from megatron_fusion.errors import UserError

PARENT_PID_ENV = "MEGATRON_FUSION_PARENT_PID"
"""The launcher's pid, exported before it starts the ranks: the parent a rank must have."""
PR_SET_PDEATHSIG = 1           # <linux/prctl.h>
LOCK_NAME = "run.lock"


# --- die with the parent ---------------------------------------------------------------------

def _set_pdeathsig() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)``; False where there is no prctl (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return False
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _guard(parent: int | None) -> None:
    """Die with the parent from now on, and at once if the parent is already not ``parent``."""
    _set_pdeathsig()
    # after the prctl: a parent that dies from here on kills us; one that died before it left us
    # re-parented (to init or a subreaper), which getppid shows
    if parent is not None and os.getppid() != parent:
        _kill_self()


def die_with_parent(parent: int | None = None) -> bool:
    """Call first thing in a process the launcher started (a trainer rank). Returns whether the
    kernel's death signal is set (False on a system without prctl: the children hooks are still
    installed). ``parent``: the pid we must be a child of; default ``$MEGATRON_FUSION_PARENT_PID``
    (unset: no check, e.g. a rank started by a plain ``torchrun``)."""
    env = os.environ.pop(PARENT_PID_ENV, "")      # popped: our own children must not see it
    if parent is None and env.isdigit():
        parent = int(env)
    ok = _set_pdeathsig()
    if parent is not None and os.getppid() != parent:
        _kill_self()
    guard_children()
    return ok


_forking_pid: int | None = None   # pid of the process in os.fork(), read in the child
_installed_in: int | None = None  # pid where the hooks below are installed


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _installed_in
    _installed_in = os.getpid()   # inherited hooks; this child's own children are guarded too
    _guard(_forking_pid)


class _SpawnGuard:
    """Rides in ``multiprocessing.current_process()._config``, which every ``Process`` copies and
    a spawn/forkserver child unpickles before it runs anything: unpickling it runs the guard in
    the child against the pid that pickled it (the process starting the child)."""

    def __reduce__(self):
        return _spawned_child_guard, (os.getpid(),)


def _spawned_child_guard(parent: int) -> _SpawnGuard:
    _guard(parent)
    guard_children()
    return _SpawnGuard()


def guard_children() -> None:
    """Make every child this process starts through Python die with it (see the module doc).
    Idempotent per process."""
    global _installed_in
    if _installed_in == os.getpid():
        return
    if _installed_in is None:    # os.register_at_fork hooks are inherited by forked children
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _installed_in = os.getpid()
    multiprocessing.current_process()._config["megatron_fusion_die_with_parent"] = _SpawnGuard()


# --- one live run per run.dir ----------------------------------------------------------------

class RunDirBusyError(UserError):
    """Another live run holds this run.dir (one line naming it)."""


class RunDirLostError(UserError):
    """This run's lock on its run.dir was taken over by another run."""


def _host() -> str:
    return socket.gethostname()


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (/proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive_here(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (on this host) is alive and is the one that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _proc_start(pid) in (None, start)


class RunDirLock:
    """Exclusive hold of a run directory by one live run; taken in the constructor.

    Args:
        run_dir: the run's ``run.dir`` (created if missing).
        heartbeat_s: the holder's thread touches the lock this often.
        stale_after_s: a lock not touched for this long is stale (its holder is gone or hung
            past recovery) and is taken over; keep it several heartbeats long.
    Raises:
        RunDirBusyError: a live run holds the dir (the message names its host, pid and lock).
    """

    def __init__(self, run_dir: str | os.PathLike, *, heartbeat_s: float = 30.0,
                 stale_after_s: float = 300.0):
        if not heartbeat_s > 0 or not stale_after_s > heartbeat_s:
            raise ValueError("RunDirLock: need 0 < heartbeat_s < stale_after_s, got "
                             f"{heartbeat_s}, {stale_after_s}")
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self.info = {"host": _host(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
                     "token": self.token, "started": time.time(),
                     "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
                     "slurm_attempt": os.environ.get("SLURM_RESTART_COUNT", "0")}
        self.taken_over: dict | None = None   # the stale holder we replaced, if any
        self.lost: dict | None = None         # set by the thread when another run took the lock
        self._stop = threading.Event()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._acquire()
        self._thread = threading.Thread(target=self._beat, name="run-dir-heartbeat", daemon=True)
        self._thread.start()

    # the lock file -------------------------------------------------------------------------
    def _read(self, path: Path | None = None) -> dict | None:
        try:
            return json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}   # unreadable (a foreign file, or a half-written legacy one): judged by age

    def _create(self) -> bool:
        """Atomic create with the full content: write a private file, hard-link it to the lock
        name (fails if the name exists; atomic on local file systems and NFS alike)."""
        tmp = self.dir / f".{LOCK_NAME}.{self.token}"
        tmp.write_text(json.dumps(self.info))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _stale(self, holder: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > self.stale_after_s:
            return True
        if holder.get("host") == self.info["host"] and isinstance(holder.get("pid"), int):
            return not _alive_here(holder["pid"], holder.get("pid_start"))
        job = holder.get("slurm_job")            # a requeue: the earlier attempt has ended
        return bool(job) and job == self.info["slurm_job"] and \
            holder.get("slurm_attempt") != self.info["slurm_attempt"]

    def _acquire(self) -> None:
        for _ in range(10):
            if self._create():
                return
            holder = self._read()
            if holder is None:                    # released meanwhile: try again
                continue
            if not self._stale(holder):
                raise RunDirBusyError(self._busy_message(holder))
            # take over: move the stale lock aside under a unique name; only one run can move
            # a given file. If what we moved is not the holder we judged (it was replaced in
            # between), put it back and look again.
            aside = self.dir / f".{LOCK_NAME}.stale.{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = self._read(aside)
            if moved != holder:
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                aside.unlink()
                continue
            aside.unlink()
            self.taken_over = holder
        raise RunDirBusyError(f"run.dir {self.dir}: could not take {self.path} (contended)")

    def _busy_message(self, holder: dict) -> str:
        try:
            age = f"{time.time() - self.path.stat().st_mtime:.0f} s ago"
        except FileNotFoundError:
            age = "just now"
        who = (f"{holder.get('host', '?')} pid {holder.get('pid', '?')}" if holder
               else "an unreadable lock")
        return (f"run.dir {self.dir} is in use by a live run ({who}, heartbeat {age}): "
                f"stop it, or use another run.dir; {self.path} is taken over once its heartbeat "
                f"is {self.stale_after_s:.0f} s old")

    # heartbeat and release -------------------------------------------------------------------
    def _touch(self) -> bool:
        """Refresh the heartbeat if the lock is still ours; record the new holder if not."""
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
            self.lost = holder or {}
            return False
        os.utime(self.path)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._touch():
                return

    def heartbeat(self) -> None:
        """Per step: refresh the lock; raise ``RunDirLostError`` if another run has taken it."""
        if self.lost is None:
            self._touch()
        if self.lost is not None:
            h = self.lost
            raise RunDirLostError(f"run.dir {self.dir}: the lock was taken over by "
                                  f"{h.get('host', '?')} pid {h.get('pid', '?')} (this run's "
                                  f"heartbeat was older than {self.stale_after_s:.0f} s); stopping")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours. Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
