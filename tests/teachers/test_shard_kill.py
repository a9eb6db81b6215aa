"""Top-K shards survive a writer PROCESS killed mid-write (SIGKILL, no cleanup runs).

TopKWriter writes at close(): a temp file in the same directory, fsync, rename. A child rewrites
one large shard generation after generation; the parent SIGKILLs it at seeded random delays after
it announces a close. Afterwards the shard on disk validates (size, sha256) and holds exactly one
complete generation, the directory reader never opens a temp file, and a leftover temp is either
refused or a complete generation (never a half file taken for good). Then a precompute run is
killed at random points and resumed: it skips the finished shards and ends with files
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import filecmp
import random
from pathlib import Path

import torch

from megatron_fusion.teachers.shards import TopKReader, TopKStoreError, read_topk_header
from tests.helpers import kill_children as kc

N, SEQ, K = 400, 512, 10           # one shard ~10 MB: its write (~0.1 s here) can be hit
PER_SHARD = 6


def _check_generation(path: Path, gen: int) -> None:
    reader = TopKReader(path)
    assert reader.headers[0]["meta"]["gen"] == gen and len(reader) == N
    want = {sid: (v, i, m) for sid, v, i, m in kc.shard_samples(gen, N, SEQ, K)
            if sid in (0, N // 2, N - 1)}
    for sid, (v, i, m) in want.items():
        values, ids, aligned = reader.get(sid)
        assert torch.equal(aligned, m)
        assert torch.equal(ids[m], i[m]) and torch.equal(values[m], v[m].bfloat16().float())
    assert torch.all(reader.teacher_ce([0, N - 1]) == gen)


def test_killed_shard_writer_leaves_the_last_good_shard(tmp_path):
    rng = random.Random(19)
    points = [(tmp_path / f"kill{i}", rng.uniform(0.0, 0.12)) for i in range(4)]

    def job(d, delay):
        d.mkdir()
        proc = kc.start("shards", path=str(d / "t-00000.topk"), n=N, seq=SEQ, k=K, gens=2)
        kc.kill_after(proc, lambda line: line == "closing 2", delay)   # gen 1 is done

    kc.run_concurrently([lambda d=d, t=t: job(d, t) for d, t in points])
    # and one kill that lands inside the write on any machine: the writer pauses half way
    mid = tmp_path / "kill_mid_write"
    mid.mkdir()
    proc = kc.start("shards", path=str(mid / "t-00000.topk"), n=N, seq=SEQ, k=K, gens=2,
                    pause_mid_write=True)
    kc.kill_after(proc, lambda line: line == "mid-write", 0.0)
    points.append((mid, -1.0))
    landed = []
    for d, delay in points:
        path = d / "t-00000.topk"
        gen = read_topk_header(path)["meta"]["gen"]      # validates magic, size, checksum
        _check_generation(path, gen)                      # one complete generation, 1 or 2
        assert TopKReader(d).paths == [path]             # a temp is never globbed as a shard
        temps = [p for p in d.iterdir() if p != path]
        for tmp in temps:
            assert tmp.name.startswith(".t-00000.topk.tmp."), tmp.name
            try:                                          # killed mid-write: refused ...
                got = read_topk_header(tmp)["meta"]["gen"]
            except TopKStoreError as e:
                assert str(tmp) in str(e) and "\n" not in str(e)
            else:                                         # ... or complete (killed before rename)
                _check_generation(tmp, got)
        landed.append((round(delay, 3), gen, len(temps)))
    print("kill points (delay s, generation on disk, temps left):", landed)
    # the mid-write kill hit the write itself: the old generation survived beside a torn temp
    assert landed[-1][1:] == (1, 1), landed


def test_killed_precompute_resumes_to_identical_shards(demo_data, tmp_path):
    train = tmp_path / "train.jsonl"      # 64 records (some dropped by the SFT filter), shards of 6
    train.write_text("\n".join(Path(demo_data["train"]).read_text().splitlines()[:64]) + "\n")
    data = {"train": str(train), "tok": demo_data["pivot_tokenizer"]}
    ref = tmp_path / "ref"
    summary = kc.precompute(data["train"], data["tok"], str(ref), PER_SHARD)
    names = sorted(p.name for p in ref.glob("*.topk"))
    assert len(names) == summary["shards"] >= 6
    rng = random.Random(1919)
    points = [(tmp_path / f"kill{i}", rng.randint(1, 3), rng.uniform(0.0, 0.3)) for i in range(2)]

    def job(out, first, delay):
        proc = kc.start("precompute", train=data["train"], tokenizer=data["tok"], out_dir=str(out),
                        per_shard=PER_SHARD)
        kc.kill_when(proc, lambda: len(list(out.glob("*.topk"))) >= first, delay)

    kc.run_concurrently([lambda p=p: job(*p) for p in points])
    for out, _, _ in points:
        before = sorted(p.name for p in out.glob("*.topk"))
        assert len(before) < len(names), "the child finished before the kill: no kill point"
        for name in before:                     # every shard on disk is a complete, good one
            read_topk_header(out / name)
        resumed = kc.precompute(data["train"], data["tok"], str(out), PER_SHARD)
        assert resumed["skipped_shards"] == len(before)
        for name in names:
            assert filecmp.cmp(ref / name, out / name, shallow=False), name
        reader = TopKReader(out)
        assert len(reader) == len(TopKReader(ref)) and reader.paths == [out / n for n in names]
