"""Checkpoints with megatron-core ``dist_checkpointing``: resumable, reshardable, crash-safe.

Layout under ``<run_dir>/checkpoints``::

    iter_0000020/            a finished checkpoint (dist_checkpointing format)
        meta.json            step, consumed samples, layout, config fingerprint
        rng/rank_00003.pt    each rank's RNG state (CPU, CUDA, Megatron's TP tracker)
    iter_0000030.tmp/        a save in progress (never read; removed by the next save)
    latest                   "iter_0000020" (written via temp file + rename)

A save writes into ``*.tmp``, barriers, then rank 0 renames it and swaps ``latest``: a crash at
any point leaves the previous ``latest`` intact. Model and optimizer go through
``sharded_state_dict`` so a checkpoint saved under one TP/PP layout loads under another
(weights and Adam moments are resharded by dist_checkpointing; RNG state is restored only when
the layout is unchanged, since it is per rank).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_fusion.errors import UserError


class CheckpointError(UserError, RuntimeError):
    pass


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The last complete checkpoint under ``ckpt_root`` (None if there is none)."""
    root = Path(ckpt_root)
    marker = root / "latest"
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    if not (path / "meta.json").exists():
        raise CheckpointError(f"{marker} points to {path}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a ``checkpoints`` root (its latest), or a run dir (its latest)."""
    p = Path(path)
    if (p / "meta.json").exists():
        return p
    for root in (p, p / "checkpoints"):
        if (root / "latest").exists():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise CheckpointError(f"{p}: no checkpoint there (expected meta.json, latest, or checkpoints/latest)")


def saved_padded_vocab(path: str | Path, model_cfg) -> int:
    """Rows of the embedding stored in a checkpoint: the vocab padded for the TP it was saved at."""
    meta = json.loads((resolve_checkpoint(path) / "meta.json").read_text())
    return model_cfg.padded_vocab_size(int(meta.get("layout", {}).get("tp", 1)))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_sharded_state_dict(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].module.sharded_state_dict()}
    return {f"model{i}": m.module.sharded_state_dict() for i, m in enumerate(model_chunks)}


def save_checkpoint(ckpt_root: str | Path, step: int, model_chunks, optimizer, scheduler, *,
                    extra: dict, keep: int = 2) -> Path:
    """Save model, optimizer, scheduler, RNG and ``extra`` (step, data position...) atomically."""
    from megatron.core import dist_checkpointing

    root = Path(ckpt_root)
    rank = dist.get_rank()
    final = root / _iter_name(step)
    tmp = root / (_iter_name(step) + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()  # empty: dist_checkpointing treats a non-empty target as a stale save
    dist.barrier()

    state = _model_sharded_state_dict(model_chunks)
    model_sd = {k: v for k, v in state.items()}
    state["optimizer"] = optimizer.sharded_state_dict(
        model_sd[next(iter(model_sd))] if len(model_sd) == 1 else model_sd)
    state["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, str(tmp))
    if rank == 0:
        (tmp / "rng").mkdir(exist_ok=True)
    dist.barrier()
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        _atomic_write_text(tmp / "meta.json", json.dumps({"step": step, **extra}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | Path, model_chunks, optimizer, scheduler, *, layout: dict,
                    load_optimizer: bool = True) -> dict:
    """Load a checkpoint into the (DDP-wrapped) chunks/optimizer/scheduler; return its meta."""
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(path)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise CheckpointError(f"{path}: not a megatron-fusion checkpoint (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if int(meta.get("step", 0)) == 0:
        # a step-0 checkpoint (train.steps=0: an init) holds no optimizer moments, since Adam
        # creates them at its first step; a fresh optimizer and scheduler are exactly that state
        load_optimizer = False
    saved_layout = meta.get("layout", {})
    same_layout = saved_layout == layout
    state = _model_sharded_state_dict(model_chunks)
    model_sd = dict(state)
    if load_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd[next(iter(model_sd))] if len(model_sd) == 1 else model_sd, is_loading=True)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as e:  # dist_checkpointing raises many types; name the checkpoint
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from e
    keys = [k for k in loaded if k.startswith("model")]
    for k, chunk in zip(sorted(keys), model_chunks):
        chunk.module.load_state_dict(loaded[k], strict=True)
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if same_layout and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    meta["rng_restored"] = bool(same_layout and rng_file.exists())
    return meta


def load_model_weights(path: str | Path, model_chunks) -> dict:
    """Load only the model weights of a checkpoint (no optimizer, scheduler or RNG) into
    ``model_chunks`` (plain GPTModel chunks or DDP-wrapped ones); return the checkpoint's meta.

    ``path``: a checkpoint, a ``checkpoints`` root or a run dir (its latest). dist_checkpointing
    reshards: the chunks may be built under another TP/PP than the run was saved with, as long as
    the virtual-pipeline chunking (the state-dict keys) and the padded vocab agree. Used for
    frozen teachers that are megatron-fusion runs.
    """
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(path)
    meta = json.loads((path / "meta.json").read_text())
    saved_vpp = meta.get("layout", {}).get("vpp") or 1
    if saved_vpp != len(model_chunks):
        raise CheckpointError(f"{path}: saved with {saved_vpp} model chunk(s) (vpp), loading into "
                              f"{len(model_chunks)}: model chunk keys differ")
    modules = [getattr(m, "module", m) for m in model_chunks]   # unwrap DDP when wrapped
    if len(modules) == 1:
        state = {"model": modules[0].sharded_state_dict()}
    else:
        state = {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as e:  # dist_checkpointing raises many types; name the checkpoint
        raise CheckpointError(f"{path}: cannot load model weights ({type(e).__name__}: {e})") from e
    for k, module in zip(list(state), modules):   # insertion order = chunk order
        module.load_state_dict(loaded[k], strict=True)
    return meta
