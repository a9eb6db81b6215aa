"""Bad input fails at start with one line naming the field or file, exit code != 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_fusion.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def _train(args, cwd=ROOT, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)          # a world of one: the child picks its own free port
    p = subprocess.run([sys.executable, "-m", "megatron_fusion.train", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr.strip().splitlines()


@pytest.mark.parametrize("override, field", [
    ("parallel.tp=3", "parallel.tp"),            # heads % tp
    ("parallel.pp=3", "parallel.pp"),            # layers % pp
    ("train.global_batch=7", "train.global_batch"),
    ("model.hiden_size=64", "model.hiden_size"),  # unknown key
    ("optim.lr=-1", "optim.lr"),
    ("train.steps=ten", "train.steps"),
    ("stage=distill", "stage"),
])
def test_bad_config_one_line(override, field):
    with pytest.raises(ConfigError) as e:
        cfg = load_config(ROOT / "configs/test/tiny_cpu.yaml", [override])
        cfg.validate_layout(6 if "pp" in override else 2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config error: {field}"), msg


def test_cli_bad_config_exit_code(tmp_path):
    code, err = _train(["--config", str(ROOT / "configs/test/tiny_cpu.yaml"), "parallel.tp=3",
                        f"run.dir={tmp_path}/r"])
    assert code != 0 and err[-1].startswith("config error: parallel.tp"), err


def test_fp8_without_transformer_engine_is_refused(tmp_path):
    """train.fp8 must not silently train in the base precision where TE cannot run it."""
    from megatron_fusion.model import check_fp8, te_available

    cfg = load_config(ROOT / "configs/test/tiny_cpu.yaml", ["train.fp8=hybrid", "train.precision=bf16"])
    if te_available():
        pytest.skip("Transformer Engine imports here: FP8 is allowed (tests/test_gpu.py runs it)")
    with pytest.raises(ConfigError, match=r"^config error: train.fp8: 'hybrid' needs the "
                                          "Transformer Engine layers on a GPU"):
        check_fp8(cfg)
    local = load_config(ROOT / "configs/test/tiny_cpu.yaml", ["train.fp8=hybrid",
                                                        "model.transformer_impl=local"])
    with pytest.raises(ConfigError, match="train.fp8"):
        check_fp8(local)
    check_fp8(load_config(ROOT / "configs/test/tiny_cpu.yaml", []))     # off: nothing to check
    code, err = _train(["--config", str(ROOT / "configs/test/tiny_cpu.yaml"), "train.fp8=hybrid",
                        "parallel.tp=1", f"run.dir={tmp_path}/r", "logging.wandb_mode=disabled"])
    assert code == 2 and err[-1].startswith("config error: train.fp8"), err


def test_cli_missing_config_file(tmp_path):
    code, err = _train(["--config", str(tmp_path / "nope.yaml")])
    assert code != 0 and "nope.yaml" in err[-1] and len(err) == 1, err


def _small(tmp_path, demo_data, **kw):
    base = ["logging.wandb_mode=disabled", "logging.progress=false", f"run.dir={tmp_path}/run",
            f"data.tokenizer={demo_data['pivot_tokenizer']}", "data.valid=[]", "train.steps=1",
            "parallel.tp=1", "model.seq_length=64", "train.global_batch=2", "train.micro_batch=2"]
    return ["--config", str(ROOT / "configs/test/tiny_cpu.yaml"), *base, *[f"{k}={v}" for k, v in kw.items()]]


@pytest.mark.slow
def test_cli_missing_data_file(tmp_path, demo_data):
    code, err = _train(_small(tmp_path, demo_data, **{"data.train": str(tmp_path / "missing.jsonl")}))
    assert code != 0 and "missing.jsonl" in err[-1] and err[-1].startswith("error"), err


@pytest.mark.slow
def test_cli_malformed_jsonl_names_file_and_line(tmp_path, demo_data):
    bad = tmp_path / "bad.jsonl"
    good = Path(demo_data["train"]).read_text().splitlines()[:3]
    bad.write_text("\n".join(good + ['{"prompt": "x", "response": ']) + "\n")
    code, err = _train(_small(tmp_path, demo_data, **{"data.train": str(bad)}))
    assert code != 0 and f"{bad}:4" in err[-1], err


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, demo_data):
    """An exploding LR makes the loss non-finite; the run stops naming it, the step-1 checkpoint
    stays the latest and loads."""
    args = _small(tmp_path, demo_data, **{"data.train": demo_data["train"],
                                          "optim.lr": "1e30", "optim.min_lr": "1e30",
                                          "optim.warmup_steps": 0, "train.steps": 6,
                                          "checkpoint.interval": 1, "optim.decay": "constant"})
    code, err = _train(args)
    assert code == 1, err
    assert "non-finite loss/ce" in err[-1], err
    ck = tmp_path / "run" / "checkpoints"
    latest = (ck / "latest").read_text().strip()
    meta = json.loads((ck / latest / "meta.json").read_text())
    assert meta["step"] >= 1 and f"{latest}" in err[-1]


@pytest.mark.slow
def test_cli_train_starts_torchrun_and_writes_metrics_and_wandb(tmp_path, demo_data):
    """`megatron-fusion train --nproc 2` end to end: metrics.jsonl per step, W&B offline run,
    a final checkpoint, and the summary on stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = tmp_path / "cli_run"
    args = _small(tmp_path, demo_data, **{"data.train": demo_data["train"], "train.steps": 3,
                                          "run.dir": str(run), "logging.wandb_mode": "offline",
                                          "parallel.tp": 2})
    p = subprocess.run([sys.executable, "-m", "megatron_fusion.cli", "train", "--nproc", "2", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss/ce" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all({"lr", "perf/tokens_per_s", "loss/total"} <= set(r) for r in steps)
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
    assert "checkpoint" in p.stdout and "metrics" in p.stdout
