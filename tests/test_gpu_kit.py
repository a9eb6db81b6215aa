"""The GPU check kit (make gpu-kit, tools/gpu_check.sh and what it runs) works before a GPU is lent.

The check itself needs a CUDA GPU; these tests keep its pieces from rotting on CPU machines: the
script parses and refuses a machine without a GPU in one line, the kit names its pinned wheels,
the synthetic top-K passes the trainer's own reader, the 1B config is ~1B, and the real-loop
measurement runs end to end at tiny size.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env(**kw) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OUT", None)
    env.update(kw)
    return env


def test_gpu_check_script_parses():
    p = subprocess.run(["bash", "-n", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA GPU is here: the dry run is for machines without one")
def test_gpu_check_without_gpu_stops_with_one_clear_line(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                       env=_env(GPU_CHECK_PYTHON=sys.executable, OUT=str(out)), timeout=120)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: needs a CUDA GPU"), p.stderr
    assert not out.exists()                       # nothing was installed, made or run


def test_make_gpu_kit_names_the_pinned_wheels():
    p = subprocess.run(["make", "-n", "gpu-kit"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    cmd = next(ln for ln in p.stdout.replace("\\\n", " ").splitlines() if "pip download" in ln)
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "-d .whl",
                 "--platform manylinux_2_28_x86_64", "--platform manylinux2014_x86_64"):
        assert flag in cmd, (flag, cmd)
    wheels = set(re.findall(r"([A-Za-z0-9_.-]+==[0-9][^\s]*)", cmd))
    assert {"megatron-core==0.16.1", "editdistance==0.8.1"} <= wheels, wheels
    # the kit's megatron-core is the one the project pins (constraints.txt)
    pin = next(ln.strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()
               if ln.startswith("megatron-core=="))
    assert pin in wheels
    assert "67108864" in p.stdout                                # the 64 MiB size check


def test_synthetic_topk_passes_the_trainers_reader(tmp_path):
    from tools.make_synthetic_topk import make_synthetic_fuse_data

    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.errors import TeacherDataError
    from megatron_fusion.teachers.offline import OfflineTeacher
    from megatron_fusion.tokenizers import load_tokenizer

    man = make_synthetic_fuse_data(tmp_path / "d", seq_len=96, samples=5, teachers=["t0", "t1"],
                                   k=4, vocab=700, samples_per_shard=2)
    assert len(list((tmp_path / "d" / "topk" / "t0").glob("*.topk"))) == 3
    # the dataset as the trainer builds it, independently of the generator
    tok = load_tokenizer(man["tokenizer"])
    ds = SFTDataset(man["train"], tok, 96, overflow="truncate")
    assert len(ds) == 5 and man["dataset_hash"] == ds.dataset_hash
    resp = torch.stack([ds[i]["loss_mask"] for i in range(len(ds))])
    assert (resp[:, 40:] == 1).all()            # past the short prompt, responses fill the window
    ids = [int(ds[i]["sample_id"]) for i in range(len(ds))]
    for name in ("t0", "t1"):
        t = OfflineTeacher(name, man["topk_dirs"][name],
                           {"teacher": name, "k": 4, "dataset_hash": ds.dataset_hash,
                            "pivot_tokenizer_hash": tok.content_hash})
        t.check_covers(ids)
        values, tids, aligned, ce, _ = t.fetch(torch.tensor(ids), 96)
        assert values.shape == (5, 96, 4) and tids.shape == (5, 96, 4) and aligned.shape == (5, 96)
        assert 0.85 < aligned.float().mean() < 1.0
        v = values[aligned]
        assert (v[:, :-1] >= v[:, 1:]).all() and v.isfinite().all()     # sorted, descending
        assert (values[~aligned] == 0).all()
        assert tids.min() >= 0 and tids.max() < 700
        assert ce.isfinite().all() and (ce > 0).all()
    # the check is real: the same shards do not fit a run at another sequence length
    other = SFTDataset(man["train"], tok, 64, overflow="truncate")
    with pytest.raises(TeacherDataError, match="dataset_hash"):
        OfflineTeacher("t0", man["topk_dirs"]["t0"], {"teacher": "t0", "k": 4,
                                                      "dataset_hash": other.dataset_hash})
    # the overrides point a config at exactly these files
    from megatron_fusion.config import load_config

    cfg = load_config(str(ROOT / "configs" / "test/gpu_check_1b.yaml"), man["overrides"])
    assert [t.topk_dir for t in cfg.fuse.teachers] == [man["topk_dirs"]["t0"], man["topk_dirs"]["t1"]]
    assert (cfg.model.seq_length, cfg.fuse.k, cfg.model.vocab_size) == (96, 4, 700)


def test_gpu_check_1b_config_is_a_1b_llama():
    from megatron_fusion.config import load_config
    from megatron_fusion.plan import param_count
    from tools.step_bench import train_flops_per_token

    cfg = load_config(str(ROOT / "configs" / "test/gpu_check_1b.yaml"))
    m = cfg.model
    assert cfg.stage == "fuse" and cfg.train.precision == "bf16" and len(cfg.fuse.teachers) == 2
    assert m.seq_length == 4096 and m.vocab_size == 151936 and m.swiglu and m.normalization == "RMSNorm"
    assert cfg.validate_layout(1) == 1
    n = param_count(m).total
    assert 0.95e9 < n < 1.1e9, n
    # 6 N + attention, counted here by hand from the config (q = h here, kv = groups x head dim)
    h, L, s, f, v = m.hidden_size, m.num_layers, m.seq_length, m.ffn_size, m.vocab_size
    kv = m.num_query_groups * (h // m.num_attention_heads)
    n_matmul = L * (h * h + 2 * h * kv + h * h + 3 * h * f) + v * h
    assert train_flops_per_token(m) == pytest.approx(6 * n_matmul + 6 * L * s * h, rel=1e-12)


def test_real_loop_measurement_cpu_smoke(tmp_path):
    """tools/bench_gpu.py at tiny size on CPU: both variants through the real trainer, 2 steps."""
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, "tools/bench_gpu.py", "--cpu-smoke", "--steps", "2",
                        "--warmup", "1", "--work-dir", str(tmp_path / "w"), "--json", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fusion / CE step-time ratio" in p.stdout
    res = json.loads(out.read_text())
    ce, fu = res["variants"]["ce"], res["variants"]["fusion"]
    for r in (ce, fu):
        assert r["steps"] == 2 and r["steps_measured"] == 1 and r["step_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(res["tokens_per_step"] / r["step_s"], rel=1e-6)
        assert r["tflops"] == pytest.approx(res["flops_per_step"] / r["step_s"] / 1e12, rel=1e-9)
    assert all(x is not None and x > 0 for x in fu["loss_uld"] + fu["loss_gld"])
    assert ce["loss_uld"] == [None, None]                       # stage sft ran no fusion loss
    assert ce["loss_ce"][0] == pytest.approx(fu["loss_ce"][0])  # same model, same first batch
    assert not (tmp_path / "w" / "runs" / "run_ce").exists()    # checkpoints cleaned up


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA GPU is here: this flow test fakes one on a CPU machine")
def test_gpu_check_records_failed_parts_and_goes_on(tmp_path):
    """With the CUDA probe faked, every GPU part fails on CPU: the script records each one,
    runs the next, writes gpu_check.json and exits 1."""
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/bash\n"
                    'if [ "$1" = "-c" ] && [ "$2" = "import torch; assert torch.cuda.is_available()" ]; '
                    "then exit 0; fi\n"
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    p = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                       env=_env(GPU_CHECK_PYTHON=str(fake), OUT=str(out), GPU_CHECK_T_TESTS="120",
                                GPU_CHECK_T_LOOP="60", GPU_CHECK_T_LOSSES="60",
                                GPU_CHECK_T_PRE="60", GPU_CHECK_T_INPUTS="120"), timeout=900)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    st = {k: v["status"] for k, v in res["parts"].items()}
    assert st == {"inputs": "ok", "gpu_tests": "ok", "real_loop": "failed",
                  "bench_losses": "failed", "precompute": "failed", "te_resume": "skipped"}, st
    assert res["parts"]["te_resume"]["reason"].startswith("no TE")
    assert res["parts"]["gpu_tests"]["counts"]["skipped"] >= 3
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and "gpu_check.log" in files and "real_loop.log" in files
    assert "needs a CUDA GPU" in (out / "real_loop.log").read_text()
