"""A checkpoint save that fails (full disk, quota, lost mount) is one line naming where, the last
good checkpoint is kept, and the failing rank exits non-zero instead of waiting in the final
barrier (train.main)."""

from __future__ import annotations

import errno

import pytest

from megatron_fusion.local_ranks import run_on_ranks

pytestmark = pytest.mark.dist


def _full_disk_at_step_2(rank, world, data, run_dir):
    import torch

    from megatron_fusion.checkpoint import CheckpointError, latest_checkpoint
    from megatron_fusion.config import load_config
    from megatron_fusion.train import train
    from tests.helpers.trainer_ranks import tiny_overrides

    real = torch.save

    def save(obj, f, *a, **k):
        if "iter_0000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    torch.save = save
    cfg = load_config("configs/test/tiny_cpu.yaml",
                      tiny_overrides(data, run_dir) + ["train.steps=3", "checkpoint.interval=1",
                                                        "parallel.tp=1"])
    try:
        train(cfg)
    except CheckpointError as e:
        return str(e), str(latest_checkpoint(f"{run_dir}/checkpoints"))
    finally:
        torch.save = real
    return None, None


def test_failed_save_is_one_line_and_keeps_the_last_good_checkpoint(demo_data, tmp_path):
    msg, latest = run_on_ranks(_full_disk_at_step_2, 1, (demo_data, str(tmp_path / "run")))[0]
    assert msg is not None and "\n" not in msg
    assert "checkpoint save of step 2" in msg and "iter_0000002.tmp" in msg
    assert "No space left on device" in msg and "iter_0000001" in msg and "is kept" in msg
    assert latest.endswith("iter_0000001")
    assert not (tmp_path / "run" / "run.lock").exists()       # the trainer let go of its run dir


def test_a_failing_rank_never_waits_in_the_final_barrier(monkeypatch):
    """train.main: a non-user error propagates with code 1, so no rank calls dist.barrier()."""
    import megatron_fusion.train as tr

    calls = []
    monkeypatch.setattr(tr, "_run_role", lambda cfg: (_ for _ in ()).throw(RuntimeError("bug")))
    monkeypatch.setattr("megatron_fusion.parallel.init_distributed", lambda **kw: None)

    class FakeDist:
        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def barrier():
            calls.append("barrier")

        @staticmethod
        def destroy_process_group():
            calls.append("destroy")

    monkeypatch.setattr(tr, "dist", FakeDist)
    with pytest.raises(RuntimeError, match="bug"):
        tr.main(["--config", "configs/test/tiny_cpu.yaml"])
    assert calls == ["destroy"]
