"""A precompute writer killed mid-shard leaves ``.<shard>.tmp.<pid>``: the next run removes it
(only when its writer is dead), and readers never take it for a shard."""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_fusion.teachers.shards import atomic_write_bytes, remove_stale_temps


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    atomic_write_bytes(tmp_path / "t-00000.topk", [b"done"])
    dead = tmp_path / f".t-00001.topk.tmp.{_dead_pid()}"
    live = tmp_path / f".t-00002.topk.tmp.{os.getpid()}"
    other = tmp_path / ".notes.txt"
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
    assert (tmp_path / "t-00000.topk").read_bytes() == b"done"
    assert remove_stale_temps(tmp_path / "missing") == []
