"""Online teachers on CPU: student TP2 + one teacher group of 2 ranks (a Megatron teacher at TP2).

Runs through the real entry (``torchrun -m megatron_fusion.train`` semantics): this file is also
the torchrun script, so it can record what each teacher source hands to ``FuseStage`` (``--dump``)
and kill a teacher rank mid-run (``--kill-after``) without any test hook in the library.

- online and offline (shards precomputed at TP2 by tools/precompute_teacher_topk.py from the same
  teacher) give identical top-K tensors and identical loss trajectories for 5 steps; the online
  run is 3 steps + a resume to 5, so the teachers restart at the checkpoint's sample;
- ``os._exit`` of a teacher rank ends the run with the teacher's name in the error, within
  ``fuse.timeout_s``, and the last checkpoint stays complete; a teacher that raises (missing
  checkpoint) sends its error, which the student reports with the teacher's name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SEQ = 64
TIMEOUT_S = 20


def _env():
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                OMP_NUM_THREADS="1")


def _torchrun(nproc: int, args: list[str], timeout: int = 300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _student_yaml(path: Path, data: dict, run_dir: Path, teacher: dict, steps: int) -> Path:
    import yaml

    cfg = {
        "stage": "fuse", "run": {"dir": str(run_dir)},
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 176, "seq_length": SEQ},
        "parallel": {"tp": 2},
        "train": {"steps": steps, "micro_batch": 2, "global_batch": 4},
        "optim": {"lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "decay": "constant"},
        "data": {"train": data["train"], "tokenizer": data["pivot_tokenizer"], "valid": []},
        "checkpoint": {"interval": 1},
        "logging": {"wandb_mode": "disabled", "progress": False},
        "fuse": {"k": 10, "prefetch": 2, "timeout_s": TIMEOUT_S, "teachers": [teacher]},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _make_teacher(rank, world, data, root, tok_dir):
    """A tiny megatron-fusion run (step 0) with its own byte-level BPE tokenizer."""
    from megatron_fusion.config import load_config
    from megatron_fusion.train import train
    from tests.helpers.trainer_ranks import tiny_overrides

    cfg = load_config(None, tiny_overrides(data, f"{root}/teacher") + [
        "train.steps=0", f"data.tokenizer={tok_dir}", "model.num_layers=2"])
    train(cfg)
    return True


@pytest.fixture(scope="module")
def online(demo_data, tmp_path_factory):
    from megatron_fusion.local_ranks import run_on_ranks
    from megatron_fusion.tokenizers import train_byte_bpe

    root = tmp_path_factory.mktemp("online")
    lines = Path(demo_data["train"]).read_text().splitlines()
    texts = [json.loads(line)["prompt"] + "\n" + json.loads(line)["response"] for line in lines]
    # 40 records: the 5 steps (20 samples) of the runs, and a short precompute
    data = dict(demo_data, train=str(root / "train.jsonl"))
    Path(data["train"]).write_text("\n".join(lines[:40]) + "\n")
    demo_data = data
    tok_dir = root / "teacher_tok"
    train_byte_bpe(texts, 400, tok_dir)
    t0 = time.perf_counter()
    run_on_ranks(_make_teacher, 1, (demo_data, str(root), str(tok_dir)))
    p = _torchrun(2, ["tools/precompute_teacher_topk.py", "--backend", "megatron",
                      "--checkpoint", str(root / "teacher"), "--data", demo_data["train"],
                      "--pivot-tokenizer", demo_data["pivot_tokenizer"],
                      "--teacher-tokenizer", str(tok_dir), "--teacher-name", "tm",
                      "--out", str(root / "topk"), "--seq-len", str(SEQ), "--no-progress"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    offline_t = {"name": "tm", "tokenizer": str(tok_dir), "topk_dir": str(root / "topk")}
    online_t = {"name": "tm", "tokenizer": str(tok_dir), "source": "online", "backend": "megatron",
                "checkpoint": str(root / "teacher"), "ranks": 2, "tp": 2}
    runs, times = {}, {"setup_s": time.perf_counter() - t0}
    for name, teacher, nproc, steps in [("offline", offline_t, 2, [5]),
                                        ("online", online_t, 4, [3, 5])]:
        for n in steps:  # the online run stops at 3 and resumes: teachers restart at sample 12
            cfg = _student_yaml(root / f"{name}.yaml", demo_data, root / name, teacher, n)
            t0 = time.perf_counter()
            p = _torchrun(nproc, [__file__, "--dump", str(root / f"dump_{name}"),
                                  "--config", str(cfg)])
            times[f"{name}_{n}_s"] = time.perf_counter() - t0
            assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        runs[name] = [json.loads(line) for line in (root / name / "metrics.jsonl").open()]
    return {"root": root, "runs": runs, "times": times, "online_t": online_t, "data": demo_data}


def _dumps(d: Path) -> dict:
    import torch

    return {p.name: torch.load(p) for p in sorted(d.iterdir())}


def assert_same_topk(off: dict, on: dict, files: list[str], batch_dependent=()) -> None:
    """Online and offline dumps (``_dumps``) hold the same micro-batches, bit for bit.

    ``batch_dependent``: teachers whose logits depend on the batch they are computed in at the
    last bit (an HF model on CPU: the offline precompute batches samples in dataset order, the
    online teacher per student micro-batch; measured: 59 of 1,510 fp32 top-K values and the CE
    of 2 of 15 samples differ between batches of 4 and of 1). Format 3 rounded the values to
    bf16, which hid that almost always; format 4 keeps ``d`` and ``c`` in fp32. For these the
    tensors must agree to the storage's resolution: ids and masks exactly, log-probs within one
    step of the 16-bit code and nearly all exactly, values to 2e-3, CE to 1e-6 relative."""
    import torch

    assert sorted(off) == sorted(on) == sorted(files), (sorted(off), sorted(on))
    aligned = 0
    for key in on:
        assert torch.equal(on[key]["sample_id"], off[key]["sample_id"]), key
        assert on[key]["teacher"] == off[key]["teacher"], key
        close = on[key]["teacher"] in batch_dependent
        for name in ("values", "ids", "aligned", "ce", "logp"):   # logp: format-4 shards
            a, b = on[key][name], off[key][name]
            assert a.dtype == b.dtype and a.shape == b.shape, (key, name, a.dtype, b.dtype)
            if close and name in ("values", "ce", "logp"):
                tol = {"values": (1e-5, 2e-3), "ce": (1e-6, 0.0), "logp": (0.0, 2 ** -10)}[name]
                assert torch.allclose(a, b, rtol=tol[0], atol=tol[1], equal_nan=True), (key, name)
                if name == "logp":
                    assert (a == b).float().mean() > 0.99, key
                continue
            assert torch.equal(a, b) or (name == "ce" and torch.allclose(
                a, b, rtol=0, atol=0, equal_nan=True)), (key, name)  # CE is NaN without response
        aligned += int(on[key]["aligned"].sum())
    assert aligned > 100                                     # the comparison is not vacuous


def test_online_topk_equals_offline(online):
    off, on = _dumps(online["root"] / "dump_offline"), _dumps(online["root"] / "dump_online")
    # both student ranks (TP2, last stage), 5 steps x 2 micro-batches each
    assert len(on) == 2 * 5 * 2
    assert_same_topk(off, on, sorted(on))


def test_online_loss_trajectory_equals_offline(online):
    keys = ("loss/total", "loss/ce", "loss/uld", "loss/gld")

    def series(recs):
        return {r["step"]: [r[k] for k in keys] for r in recs if "loss/total" in r}

    off, on = series(online["runs"]["offline"]), series(online["runs"]["online"])
    assert sorted(off) == sorted(on) == [1, 2, 3, 4, 5]
    assert all(v > 0 for v in off[1])
    assert on == off
    waits = [r["teacher/wait_s"] for r in online["runs"]["online"] if "teacher/wait_s" in r]
    tps = [r["teacher/tm/tokens_per_s"] for r in online["runs"]["online"] if "loss/total" in r]
    assert len(waits) == 5 and all(w >= 0 for w in waits) and all(t > 0 for t in tps)


def test_killed_teacher_rank_fails_fast_with_its_name(online):
    root = online["root"]
    cfg = _student_yaml(root / "kill.yaml", online["data"], root / "kill", online["online_t"], 50)
    stamp = root / "killed_at"
    p = _torchrun(4, [__file__, "--kill-after", "3", str(stamp), "--config", str(cfg)])
    end = time.time()
    out = p.stdout + p.stderr
    assert p.returncode != 0 and stamp.exists(), out[-3000:]
    assert "error: teacher tm" in out, out[-3000:]
    # the student gives up after fuse.timeout_s at the latest; torchrun's teardown adds seconds
    waited = end - float(stamp.read_text())
    assert waited < TIMEOUT_S + 10, (waited, out[-2000:])
    latest = (root / "kill" / "checkpoints" / "latest").read_text().strip()
    assert (root / "kill" / "checkpoints" / latest / "meta.json").exists()


def test_teacher_rank_killed_by_signal_is_named_by_the_launcher(online):
    """A SIGKILLed teacher rank (OOM killer): torchrun tears the launch down, and the launcher
    (megatron_fusion.supervise, as `megatron-fusion train` and launch/*.sh run it) names the
    teacher and its rank; the last checkpoint stays complete."""
    root = online["root"]
    cfg = _student_yaml(root / "sigkill.yaml", online["data"], root / "sigkill",
                        online["online_t"], 50)
    stamp = root / "sigkilled_at"
    script = ("import sys; from megatron_fusion.config import load_config; "
              "from megatron_fusion.supervise import run_torchrun; "
              "sys.exit(run_torchrun(sys.argv[2:], load_config(sys.argv[1], []), 4))")
    cmd = [sys.executable, "-c", script, str(cfg), "--standalone", "--nproc-per-node=4",
           __file__, "--kill-after", "3", str(stamp), "--sigkill", "--config", str(cfg)]
    p = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    end = time.time()
    out = p.stdout + p.stderr
    assert p.returncode == 1 and stamp.exists(), out[-3000:]
    want = ("error: teacher tm (launch rank 3: tp rank 1 of replica 0) was killed by SIGKILL "
            "(out of memory?); the student was stopped; its last checkpoint is kept")
    assert want in out, out[-3000:]
    assert end - float(stamp.read_text()) < TIMEOUT_S + 10, out[-2000:]
    latest = (root / "sigkill" / "checkpoints" / "latest").read_text().strip()
    assert (root / "sigkill" / "checkpoints" / latest / "meta.json").exists()


def test_demo_online_config_through_megatron_fusion_train(online):
    """`megatron-fusion train --config configs/demo/tiny_online.yaml` (no --nproc) starts the
    6 ranks the config needs (student TP2 + 2 teacher groups x 2) and trains; both teachers point
    at the test's tiny teacher, data and sizes are shrunk by overrides."""
    root, t = online["root"], online["online_t"]
    over = [f"run.dir={root / 'demo_online'}", f"data.train={online['data']['train']}",
            f"data.tokenizer={online['data']['pivot_tokenizer']}", "data.valid=[]",
            f"model.seq_length={SEQ}", "train.steps=2", "train.micro_batch=2",
            "train.global_batch=4", "logging.wandb_mode=disabled", "logging.progress=false",
            f"fuse.timeout_s={TIMEOUT_S}"]
    for i in (0, 1):
        over += [f"fuse.teachers.{i}.checkpoint={t['checkpoint']}",
                 f"fuse.teachers.{i}.tokenizer={t['tokenizer']}"]
    p = subprocess.run([sys.executable, "-m", "megatron_fusion.cli", "train", "--config",
                        "configs/demo/tiny_online.yaml", *over], env=_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(x) for x in (root / "demo_online" / "metrics.jsonl").open()]
    steps = [r for r in recs if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:   # both online teachers streamed top-K to the student every step
        assert r["teacher/arith/tokens_per_s"] > 0 and r["teacher/string/tokens_per_s"] > 0, r
        assert r["loss/uld"] > 0 and r["teacher/wait_s"] >= 0, r


def test_teacher_error_reaches_student_with_its_name(online):
    root = online["root"]
    bad = dict(online["online_t"], checkpoint=str(root / "no_such_run"))
    cfg = _student_yaml(root / "bad.yaml", online["data"], root / "bad", bad, 2)
    p = _torchrun(4, ["-m", "megatron_fusion.train", "--config", str(cfg)])
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "error: teacher tm failed: " in out, out[-3000:]
    assert "CheckpointError" in out and "no_such_run" in out, out[-3000:]


# --- packed batches (data.packing, docs/methods.md §10) ----------------------------------------

@pytest.fixture(scope="module")
def online_packed(online):
    """The same teacher, offline and online, with ``data.packing=greedy``: 16 samples a step
    (one student replica at TP2), rows of 64 slots, 2 rows a micro-batch, so packed micro-batches
    mix the teacher's micro-batches. The teacher computes 2 samples a micro-batch, as in the
    unpacked runs (its CE is bit-equal to the shards' at that batch size, not at 1)."""
    import yaml

    root, runs = online["root"], {}
    offline_t = {"name": "tm", "tokenizer": online["online_t"]["tokenizer"],
                 "topk_dir": str(root / "topk")}
    for name, teacher, nproc in [("offline_packed", offline_t, 2),
                                 ("online_packed", online["online_t"], 4)]:
        path = _student_yaml(root / f"{name}.yaml", online["data"], root / name, teacher, 3)
        cfg = yaml.safe_load(path.read_text())
        cfg["train"].update(global_batch=16, micro_batch=2)
        cfg["data"]["packing"] = "greedy"
        path.write_text(yaml.safe_dump(cfg))
        p = _torchrun(nproc, [__file__, "--dump", str(root / f"dump_{name}"), "--config", str(path)])
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        runs[name] = [json.loads(line) for line in (root / name / "metrics.jsonl").open()]
    return runs


def test_online_and_offline_teachers_give_identical_packed_batches(online, online_packed):
    root = online["root"]
    off, on = _dumps(root / "dump_offline_packed"), _dumps(root / "dump_online_packed")
    # fetched per unpacked micro-batch (2 samples) in step order: 2 ranks x 3 steps x 8
    assert len(on) == 2 * 3 * 8
    assert_same_topk(off, on, sorted(on))
    keys = ("loss/total", "loss/ce", "loss/uld", "loss/gld")
    series = {n: {r["step"]: [r[k] for k in keys] for r in recs if "loss/total" in r}
              for n, recs in online_packed.items()}
    assert sorted(series["online_packed"]) == [1, 2, 3]
    assert series["online_packed"] == series["offline_packed"]
    # the rows were packed: some step held its 16 samples in fewer than 16 rows of 64 slots
    slots = [r["perf/tokens_per_s"] * r["perf/step_s"] for r in online_packed["online_packed"]
             if "perf/step_s" in r]
    assert min(slots) < 16 * SEQ - 1, slots


# --- the torchrun script ---------------------------------------------------------------------

def _instrument(argv: list[str]) -> list[str]:
    """--dump DIR: save what every teacher source returns; --kill-after N STAMP: teacher launch
    rank 3 writes the time to STAMP and calls os._exit(0) after N micro-batches, once the
    student's first checkpoint exists (--sigkill: it sends itself SIGKILL instead, as the
    kernel's OOM killer would)."""
    import torch

    if "--dump" in argv:
        i = argv.index("--dump")
        out = Path(argv[i + 1])
        del argv[i:i + 2]
        from megatron_fusion.teachers.online.client import OnlineTeacher
        from megatron_fusion.teachers.offline import OfflineTeacher

        calls = [0]

        def wrap(fetch):
            def fetch_and_dump(self, sample_ids, seq_len):
                got = fetch(self, sample_ids, seq_len)
                values, ids, aligned, ce, logp = got
                out.mkdir(parents=True, exist_ok=True)
                calls[0] += 1
                torch.save({"sample_id": sample_ids.clone(), "values": values, "ids": ids,
                            "aligned": aligned, "ce": ce, "logp": logp, "teacher": self.name},
                           out / f"rank{os.environ['RANK']}_{calls[0]:03d}.pt")
                return got
            return fetch_and_dump

        # the online run resumes in a second launch: continue the numbering
        calls[0] = len(list(out.glob(f"rank{os.environ['RANK']}_*.pt"))) if out.exists() else 0
        OnlineTeacher.fetch = wrap(OnlineTeacher.fetch)
        OfflineTeacher.fetch = wrap(OfflineTeacher.fetch)
    if "--kill-after" in argv:
        i = argv.index("--kill-after")
        n, stamp = int(argv[i + 1]), Path(argv[i + 2])
        del argv[i:i + 3]
        sigkill = "--sigkill" in argv
        if sigkill:
            argv.remove("--sigkill")
        if os.environ["RANK"] == "3":
            import megatron_fusion.teachers.topk as tt   # run_teacher imports it at call time

            import yaml

            cfg_path = argv[argv.index("--config") + 1]
            latest = Path(yaml.safe_load(Path(cfg_path).read_text())["run"]["dir"]) / \
                "checkpoints" / "latest"
            compute, count = tt.compute_batch_topk, [0]

            def compute_then_die(*a, **kw):
                count[0] += 1
                if count[0] > n:
                    # the teacher runs ahead of the student (prefetch): die only once the
                    # student has saved a checkpoint, so "the last checkpoint is kept" is
                    # checkable however the cores are shared
                    deadline = time.time() + 240
                    while not latest.exists() and time.time() < deadline:
                        time.sleep(0.05)
                    stamp.write_text(str(time.time()))
                    if sigkill:
                        import signal

                        os.kill(os.getpid(), signal.SIGKILL)
                    # exit code 0: torchrun does not tear the launch down, so the student must
                    # find out by itself (a non-zero exit makes torchrun SIGTERM every rank
                    # within seconds: the student then stops at the step's end and checkpoints)
                    os._exit(0)
                return compute(*a, **kw)

            tt.compute_batch_topk = compute_then_die
    return argv


if __name__ == "__main__":
    from megatron_fusion.train import main

    sys.exit(main(_instrument(sys.argv[1:])))
