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

Layer specs: the Transformer Engine spec names the parameters differently from the local one
(its norms live inside the fused linears, its modules carry FP8 ``_extra_state``). meta.json
records the spec a checkpoint was written with (``layer_spec``: "local" or "te"; absent = local,
all earlier checkpoints); loading into a model of the other spec renames the *checkpoint keys*
of the model's sharded state dict (``ShardedBase.key``, as megatron's own
``sharded_state_dict_keys_map`` does), so a CPU (local) checkpoint resumes on a TE GPU run and
back. Optimizer keys are derived from those model keys, so they follow. A TE ``_extra_state``
the checkpoint lacks is loaded as None (a fresh TE module accepts it: no FP8 scaling history).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_fusion.errors import UserError


class CheckpointError(UserError, RuntimeError):
    pass


# --- layer-spec names (megatron-core 0.16.1: gpt_layer_specs.py, extensions/transformer_engine.py) -

LAYER_SPECS = ("local", "te")
EXTRA_STATE = "_extra_state"

# Plain state-dict keys, local -> TE. Local layers: ShardedNorm (``.norm.weight``) at
# input_layernorm / pre_mlp_layernorm / final_layernorm. TE layers: TELayerNormColumnParallelLinear
# holds the norm as ``layer_norm_weight`` (+ ``layer_norm_bias`` for LayerNorm); the final norm is
# a TENorm (``weight``). q/k layernorms (unused here) are plain norms in both specs: same names.
_PLAIN_LOCAL_TO_TE = [
    (r"(\.layers\.\d+\.)input_layernorm\.norm\.(weight|bias)$", r"\1self_attention.linear_qkv.layer_norm_\2"),
    (r"(\.layers\.\d+\.)pre_mlp_layernorm\.norm\.(weight|bias)$", r"\1mlp.linear_fc1.layer_norm_\2"),
    (r"(^|\.)final_layernorm\.norm\.(weight|bias)$", r"\1final_layernorm.\2"),
]
_PLAIN_TE_TO_LOCAL = [
    (r"(\.layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r"\1input_layernorm.norm.\2"),
    (r"(\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_(weight|bias)$", r"\1pre_mlp_layernorm.norm.\2"),
    (r"(^|\.)final_layernorm\.(weight|bias)$", r"\1final_layernorm.norm.\2"),
]
# Checkpoint (sharded) keys have no layer index, and the local spec's sharded_state_dict_keys_map
# already moves its norms under the fused linears: ``linear_qkv.layer_norm_`` + ``norm.weight``.
_SHARDED_LOCAL_TO_TE = [
    (r"\.(linear_qkv|linear_fc1)\.layer_norm_norm\.(weight|bias)$", r".\1.layer_norm_\2"),
    (r"(^|\.)final_layernorm\.norm\.(weight|bias)$", r"\1final_layernorm.\2"),
]
_SHARDED_TE_TO_LOCAL = [
    (r"\.(linear_qkv|linear_fc1)\.layer_norm_(weight|bias)$", r".\1.layer_norm_norm.\2"),
    (r"(^|\.)final_layernorm\.(weight|bias)$", r"\1final_layernorm.norm.\2"),
]
# Modules with an ``_extra_state`` in the TE spec: every TE module (TransformerEngineBaseModule,
# and TE >= 2's op-based norms). Of these the local spec has only the linears (value None).
_TE_EXTRA_STATE = re.compile(r"(\.(linear_qkv|linear_proj|linear_fc1|linear_fc2|core_attention)"
                             r"|(^|\.)final_layernorm)\._extra_state$")
_LOCAL_EXTRA_STATE = re.compile(r"(\.(linear_qkv|linear_proj|linear_fc1|linear_fc2)"
                                r"|(^|\.)output_layer)\._extra_state$")


def _check_spec(spec: str, what: str) -> None:
    if spec not in LAYER_SPECS:
        raise CheckpointError(f"{what}: layer spec {spec!r} is not one of {LAYER_SPECS}")


def map_name(name: str, src: str, dst: str, *, sharded: bool = False) -> str:
    """One state-dict key (``sharded``: a checkpoint key) from layer spec ``src`` to ``dst``."""
    _check_spec(src, "map_name src")
    _check_spec(dst, "map_name dst")
    if src == dst:
        return name
    rules = {(False, "local"): _PLAIN_LOCAL_TO_TE, (False, "te"): _PLAIN_TE_TO_LOCAL,
             (True, "local"): _SHARDED_LOCAL_TO_TE, (True, "te"): _SHARDED_TE_TO_LOCAL}[sharded, src]
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def empty_te_extra_state() -> torch.Tensor:
    """What a TE module without FP8 state returns from get_extra_state (and accepts back). On
    the CPU by TE's design: extra state is never put on the GPU."""
    return torch.empty(0, dtype=torch.uint8)


def map_state_dict(state: dict, src: str, dst: str) -> dict:
    """A GPTModel state dict (plain keys, with layer indices) from layer spec ``src`` to ``dst``.

    local -> te: norms renamed into the fused linears; each TE module gets an empty extra state
    (the local linears' None becomes one too). te -> local: renamed back; the extra state of the
    linears becomes None (what the local layers hold) and the TE-only ones (core_attention, the
    final norm) are dropped: FP8 scaling history has no place in the local model. Both directions
    round-trip exactly (TE extra states: when they are empty, i.e. no FP8 history).
    """
    if src == dst:
        return dict(state)
    out = {}
    for name, value in state.items():
        new = map_name(name, src, dst)
        if new.endswith(EXTRA_STATE):
            if dst == "local":
                if not _LOCAL_EXTRA_STATE.search(new):
                    continue                      # TE-only module (core_attention, final norm)
                value = None
            elif _TE_EXTRA_STATE.search(new):
                value = empty_te_extra_state()
        out[new] = value
    if dst == "te":                               # TE modules that have no local counterpart
        for name in list(out):
            m = re.match(r"(.*\.layers\.\d+\.self_attention\.)linear_qkv\.weight$", name)
            if m:
                out.setdefault(m.group(1) + "core_attention._extra_state", empty_te_extra_state())
            m = re.match(r"(^|.*\.)final_layernorm\.weight$", name)
            if m:
                out.setdefault(m.group(1) + "final_layernorm._extra_state", empty_te_extra_state())
    return out


def rename_sharded_keys(sharded_state_dict: dict, src: str, dst: str) -> None:
    """In place: the checkpoint key of every ShardedTensor/Factory/Object in a model's sharded
    state dict, from layer spec ``src`` to ``dst`` (the dict keys, the module's own, stay)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    def rename(x):
        if isinstance(x, ShardedBase):
            x.key = map_name(x.key, src, dst, sharded=True)
        return x

    if src != dst:
        dict_list_map_inplace(rename, sharded_state_dict)


def model_layer_spec(module) -> str:
    """"te" when the model is built from Transformer Engine modules, else "local"."""
    for m in getattr(module, "module", module).modules():
        if type(m).__module__.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine")):
            return "te"
    return "local"


def saved_layer_spec(meta: dict, path) -> str:
    spec = meta.get("layer_spec", "local")      # written by every save since it existed
    _check_spec(spec, f"{path}/meta.json: layer_spec")
    return spec


def load_sharded_model_state(path, state: dict, *, model_spec: str, saved_spec: str,
                             rename: bool = True) -> dict:
    """``dist_checkpointing.load`` of ``state`` (``{"model": sharded sd, ..., "optimizer": ...}``
    built for a ``model_spec`` model) from a checkpoint written with ``saved_spec``: model keys
    renamed first; a requested ``_extra_state`` the checkpoint lacks is left out (the caller
    completes it with ``fill_extra_state``); any other absent tensor fails naming its key.
    ``rename=False``: the caller renamed them already (before deriving optimizer keys)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    for k in state:
        if rename and k.startswith("model"):
            rename_sharded_keys(state[k], model_spec, saved_spec)
    try:
        loaded, _, absent = dist_checkpointing.load(state, str(path), strict=StrictHandling.RETURN_ALL)
    except Exception as e:  # dist_checkpointing raises many types; name the checkpoint
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from e
    # megatron calls "unexpected" the requested keys that the checkpoint does not hold
    bad = sorted(k for k in absent if not k.endswith(EXTRA_STATE))
    if bad:
        raise CheckpointError(f"{path}: no {bad[0]!r} in the checkpoint (written with the "
                              f"{saved_spec} layer spec, loading a {model_spec} model)"
                              + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    return loaded


def fill_extra_state(loaded: dict, expected_keys) -> dict:
    """``loaded`` with None for each ``_extra_state`` of ``expected_keys`` it lacks (TE modules
    take None as 'no FP8 state'; local layers ignore extra state)."""
    for name in expected_keys:
        if name.endswith(EXTRA_STATE) and name not in loaded:
            loaded[name] = None
    return loaded


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete, readable checkpoint; None when it is one.

    Checks what a crash, a full disk or a bad copy leaves behind without loading any tensor:
    meta.json parses and has a step, megatron's metadata.json and common.pt exist, the
    dist_checkpointing index (``.metadata``) unpickles, and every storage file it names exists
    and is at least as long as the last byte range it indexes there (a truncated shard fails).
    The same answer on every rank (one shared filesystem), so all ranks pick the same fallback.
    """
    p = Path(path)
    if not p.is_dir():
        return "not a directory"
    try:
        meta = json.loads((p / "meta.json").read_text())
        int(meta["step"])
    except FileNotFoundError:
        return "no meta.json"
    except (ValueError, KeyError, TypeError) as e:
        return f"meta.json unreadable ({type(e).__name__}: {e})"
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not (p / name).is_file():
            return f"no {name}"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        index = FileSystemReader(str(p)).read_metadata()
    except Exception as e:  # a truncated/garbled pickle raises anything
        return f".metadata unreadable ({type(e).__name__})"
    need: dict[str, int] = {}
    for info in getattr(index, "storage_data", {}).values():
        rel = info.relative_path
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(need.items()):
        f = p / rel
        if not f.is_file():
            return f"no {rel}"
        if f.stat().st_size < end:
            return f"{rel} truncated ({f.stat().st_size} < {end} bytes)"
    return None


def _warn_once(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The last complete checkpoint under ``ckpt_root`` (None if there is none).

    When the one ``latest`` names is corrupted (``checkpoint_problem``), falls back to the
    newest complete ``iter_*`` below it, with a one-line warning naming the corrupted dir; it
    raises when no complete one is left (rather than silently start from scratch).
    """
    root = Path(ckpt_root)
    marker = root / "latest"
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    path = root / name
    problem = checkpoint_problem(path) if name else "'latest' is empty"
    if problem is None:
        return path
    older = sorted((p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")
                    and (not name or p.name < name)), reverse=True)
    for cand in older:
        if checkpoint_problem(cand) is None:
            _warn_once(f"checkpoint {path} is corrupted ({problem}); resuming from {cand} instead")
            return cand
    raise CheckpointError(f"{marker} points to {path}, which is not a complete checkpoint "
                          f"({problem}), and no older complete one is under {root}")


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
    try:
        dist_checkpointing.save(state, str(tmp))
        if rank == 0:
            (tmp / "rng").mkdir(exist_ok=True)
        dist.barrier()
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    except (OSError, RuntimeError) as e:
        # a full disk, a quota, a lost mount: one line naming where; the last good one is kept
        # (``latest`` still names it). Raised on the rank that failed; the launcher stops the rest.
        cause = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint save of step {step} to {tmp} failed on rank {rank} "
                              f"({cause}); the last good checkpoint "
                              f"{latest_checkpoint(root) or '(none)'} is kept") from None
    dist.barrier()
    if rank == 0:
        meta = {"step": step, "layer_spec": model_layer_spec(model_chunks[0]), **extra}
        _atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
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
    """Load a checkpoint into the (DDP-wrapped) chunks/optimizer/scheduler; return its meta.
    A checkpoint of the other layer spec (meta ``layer_spec``) loads through the name mapping."""
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
    model_spec, saved_spec = model_layer_spec(model_chunks[0]), saved_layer_spec(meta, path)
    state = _model_sharded_state_dict(model_chunks)
    for sd in state.values():   # before the optimizer's keys are derived from the model's
        rename_sharded_keys(sd, model_spec, saved_spec)
    model_sd = dict(state)
    if load_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd[next(iter(model_sd))] if len(model_sd) == 1 else model_sd, is_loading=True)
    loaded = load_sharded_model_state(path, state, model_spec=model_spec, saved_spec=saved_spec,
                                      rename=False)
    keys = [k for k in loaded if k.startswith("model")]
    for k, chunk in zip(sorted(keys), model_chunks):
        own = chunk.module.state_dict().keys()
        chunk.module.load_state_dict(fill_extra_state(loaded[k], own), strict=True)
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
    loaded = load_sharded_model_state(path, state, model_spec=model_layer_spec(modules[0]),
                                      saved_spec=saved_layer_spec(meta, path))
    for k, module in zip(list(state), modules):   # insertion order = chunk order
        module.load_state_dict(fill_extra_state(loaded[k], module.state_dict().keys()), strict=True)
    return meta
