"""A corrupted newest checkpoint: resume falls back to the previous complete one, loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_fusion.checkpoint import CheckpointError, checkpoint_problem, latest_checkpoint


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A directory with what a real save writes: a DCP index + storage, common.pt, meta.json."""
    import torch.distributed.checkpoint as dcp

    d = root / f"iter_{step:07d}"
    d.mkdir(parents=True)
    dcp.save({"w": torch.arange(1000, dtype=torch.float32) + step}, checkpoint_id=str(d), no_dist=True)
    torch.save({}, d / "common.pt")
    (d / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (d / "meta.json").write_text(json.dumps({"step": step}))
    (root / "latest").write_text(d.name)
    return d


@pytest.fixture
def ckpts(tmp_path):
    root = tmp_path / "checkpoints"
    return root, [_fake_checkpoint(root, s) for s in (1, 2, 3)]


def _truncate_storage(d: Path) -> None:
    f = next(d.glob("*.distcp"))
    f.write_bytes(f.read_bytes()[:100])


CORRUPTIONS = {
    "storage truncated": (_truncate_storage, "truncated"),
    "no meta.json": (lambda d: (d / "meta.json").unlink(), "no meta.json"),
    "meta.json garbled": (lambda d: (d / "meta.json").write_text('{"step": '), "meta.json unreadable"),
    "index garbled": (lambda d: (d / ".metadata").write_bytes(b"\x80\x04garbage"), ".metadata unreadable"),
    "storage missing": (lambda d: next(d.glob("*.distcp")).unlink(), "no __"),
    "common.pt missing": (lambda d: (d / "common.pt").unlink(), "no common.pt"),
}


def test_complete_newest_is_taken_silently(ckpts, capsys):
    root, dirs = ckpts
    assert checkpoint_problem(dirs[-1]) is None
    assert latest_checkpoint(root) == dirs[-1]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupted_newest_falls_back_loudly(ckpts, capsys, how):
    root, dirs = ckpts
    corrupt, why = CORRUPTIONS[how]
    corrupt(dirs[-1])
    assert why in checkpoint_problem(dirs[-1])
    assert latest_checkpoint(root) == dirs[-2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(dirs[-1]) in err[0] and str(dirs[-2]) in err[0], err


def test_falls_back_past_several(ckpts, capsys):
    root, dirs = ckpts
    _truncate_storage(dirs[2])
    (dirs[1] / "meta.json").unlink()
    assert latest_checkpoint(root) == dirs[0]
    assert str(dirs[2]) in capsys.readouterr().err


def test_none_complete_raises(ckpts):
    root, dirs = ckpts
    for d in dirs:
        _truncate_storage(d)
    with pytest.raises(CheckpointError, match="no older complete one"):
        latest_checkpoint(root)


def test_tmp_dirs_are_never_candidates(ckpts):
    root, dirs = ckpts
    _truncate_storage(dirs[2])
    (root / "iter_0000002.tmp").mkdir()
    assert latest_checkpoint(root) == dirs[1]
