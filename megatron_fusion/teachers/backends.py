"""Frozen teacher models that produce logits: the ``TeacherBackend`` protocol and its backends.

Backends implement ``TeacherBackend``: ``local_logits(input_ids [b, s]) -> [b, s, v_local]`` (this
rank's vocab shard on the model's device, any float dtype, padding columns allowed past
``vocab_size``), ``vocab_size`` (output rows that may be tokens), ``tp_group`` (None for a single
shard). The statistics and the top-K run over the teacher tokenizer's ids only
(``true_vocab_size``): an HF embedding padded past the tokenizer (Qwen2.5: 152,064 rows, 151,665
tokens) never reaches a shard.

- ``HFTeacherBackend``: transformers, a local directory or a GGUF, loaded in ``dtype`` onto ``device``.
- ``VocabShardedBackend``: splits a full-vocab backend Megatron-style across a TP group (tests,
  and teachers whose logits are small enough to compute whole on each rank).
- ``MegatronTeacherBackend``: a frozen megatron-fusion run (its config.yaml + dist checkpoint),
  rebuilt at the current TP (vocab-sharded logits, resharded weights).

``open_backend`` opens one for the precompute commands and online HF teachers: on ``cuda:LOCAL_RANK``
in bf16 when CUDA is available, cpu fp32 otherwise (``--device`` / ``--dtype``).
"""

from __future__ import annotations

import os

import contextlib
from pathlib import Path
from typing import Protocol

import torch


class TeacherBackend(Protocol):
    vocab_size: int            # output rows that may be tokens (columns >= it are padding); the
                               # true vocab is the tokenizer's size (true_vocab_size), <= this
    tp_group: object           # torch.distributed group over the vocab shards, or None

    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] int64 -> logits [b, s, v_local] (this rank's vocab shard)."""
        ...


class HFTeacherBackend:
    """A transformers causal LM (local directory, or a GGUF file in it), eval, no grad, loaded in
    ``dtype`` onto ``device`` (the caller's rank device: ``cuda:LOCAL_RANK`` or cpu).

    ``vocab_size`` is the model's output rows (the text config's ``vocab_size``; Gemma-3 4B+ load
    as Gemma3ForConditionalGeneration and run on text alone), which may include padding
    rows no tokenizer id reaches (Qwen2.5: 152,064 rows, 151,665 tokens); the true vocabulary of
    a batch is the teacher tokenizer's size (``true_vocab_size``).
    """

    def __init__(self, model_dir: str | Path | None = None, *, gguf_file: str | None = None,
                 model=None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if model is None:
            from transformers import AutoModelForCausalLM

            kw = {"gguf_file": gguf_file} if gguf_file else {}
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kw)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        # the text model's rows: a multimodal checkpoint (Gemma-3 4B+, Gemma3ForConditionalGeneration)
        # keeps vocab_size in its text_config; get_text_config() is the config itself otherwise
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        self.tp_group = None

    @torch.no_grad()
    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] (any device) -> [b, s, v] on ``self.device`` in the model's dtype
        (the top-K and log-prob functions compute in fp32 from bf16 without a full fp32 copy)."""
        out = self.model(input_ids=input_ids.to(self.device, non_blocking=True), use_cache=False)
        return out.logits                                           # [b, s, v]


class VocabShardedBackend:
    """This TP rank's Megatron-style vocab shard of a full-vocab backend's logits.

    The vocab is padded to a multiple of ``tp * pad_multiple``; rank r holds columns
    ``[r * v_local, (r + 1) * v_local)``; padding columns hold 0 (never selected: ``vocab_size``).
    """

    def __init__(self, full: TeacherBackend, tp_group, pad_multiple: int = 1):
        import torch.distributed as dist

        self.full, self.tp_group = full, tp_group
        self.vocab_size = full.vocab_size
        tp = dist.get_world_size(tp_group)
        self.rank = dist.get_rank(tp_group)
        m = tp * pad_multiple
        self.v_local = -(-self.vocab_size // m) * m // tp

    @torch.no_grad()
    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        z = self.full.local_logits(input_ids)                      # [b, s, v]
        a = self.rank * self.v_local
        out = z.new_zeros(*z.shape[:-1], self.v_local)             # [b, s, v/tp]
        n = max(0, min(self.v_local, self.vocab_size - a))
        out[..., :n] = z[..., a:a + n]
        return out


class MegatronTeacherBackend:
    """A frozen teacher that is a megatron-fusion run: GPTModel from its ``config.yaml``, weights
    from its dist checkpoint (resharded to this TP), eval mode, no grad.

    ``run_dir_or_checkpoint``: a run dir (its latest checkpoint), its ``checkpoints`` root or one
    ``iter_*`` checkpoint (the config is looked up in the run dir above it). Megatron's
    model-parallel state must be initialised (``init_student_groups(tp=...)``) with pipeline
    size 1; the model is built at that TP, and ``tp_group`` (default: that TP group) must be it.
    The embedding keeps the padded vocab the run was saved with, so any TP that divides it loads.
    ``precision`` ("bf16", "fp16", "fp32"; None = the run's ``train.precision``): the dtype the
    model is built and run in (the checkpoint's weights are cast on load). Device: this rank's
    ``cuda:current_device`` (``init_distributed`` set it to LOCAL_RANK) when CUDA is available.
    """

    def __init__(self, run_dir_or_checkpoint: str | Path, tp_group=None,
                 precision: str | None = None):
        import dataclasses
        import json

        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from megatron_fusion.checkpoint import load_model_weights, resolve_checkpoint
        from megatron_fusion.config import load_config
        from megatron_fusion.model import build_model

        src = Path(run_dir_or_checkpoint)
        ckpt = resolve_checkpoint(src)
        cfg_path = next((c for c in (src / "config.yaml", ckpt.parent.parent / "config.yaml")
                         if c.is_file()), None)
        if cfg_path is None:
            raise FileNotFoundError(f"{src}: no config.yaml of the run (looked in {src} and "
                                    f"{ckpt.parent.parent})")
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("MegatronTeacherBackend: Megatron's parallel state is not "
                               "initialised; call "
                               "megatron_fusion.parallel.init_student_groups(tp=...) first")
        if ps.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("MegatronTeacherBackend: a teacher runs with pipeline size 1, the "
                             "parallel state has "
                             f"pp={ps.get_pipeline_model_parallel_world_size()}; "
                             "init_student_groups(tp=..., pp=1) for the teacher")
        group = ps.get_tensor_model_parallel_group()
        if tp_group is not None and (dist.get_process_group_ranks(tp_group)
                                     != dist.get_process_group_ranks(group)):
            raise ValueError("MegatronTeacherBackend: tp_group must be Megatron's tensor-parallel "
                             "group (the model's layers communicate over it)")
        tp = ps.get_tensor_model_parallel_world_size()
        cfg = load_config(cfg_path)
        if cfg.model.vocab_size <= 0:
            raise ValueError(f"{cfg_path}: model.vocab_size is {cfg.model.vocab_size}; a run's "
                             "config.yaml (written by the trainer) has the true vocab size")
        meta = json.loads((ckpt / "meta.json").read_text())
        saved_tp = int(meta.get("layout", {}).get("tp", cfg.parallel.tp))
        padded = cfg.model.padded_vocab_size(saved_tp)    # the embedding's global rows on disk
        if padded % tp:
            raise ValueError(f"{ckpt}: padded vocab {padded} (saved at tp={saved_tp}) is not "
                             f"divisible by the teacher's tp={tp}")
        # inference layout: this TP, one stage, no SP / recompute
        cfg.parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=1, vpp=None,
                                           sequence_parallel=False)
        cfg.train.recompute = None
        if precision is not None and precision != cfg.train.precision:
            cfg.train.precision, cfg.train.fp8 = precision, None
        cuda = torch.cuda.is_available()
        # The init is overwritten by the checkpoint; keep the caller's RNG streams untouched.
        # Megatron's TP RNG tracker must hold its streams (forward forks them even without
        # dropout): seeded here when the caller has not, restored when it has.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            tracker = tensor_parallel.get_cuda_rng_tracker()
            saved_states = tracker.get_states() if tracker.is_initialized() else None
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
            chunks = build_model(cfg, vocab_size=padded, pp_rank=0, pp_size=1)
            if saved_states is not None:
                tracker.set_states(saved_states)
        self.meta = load_model_weights(ckpt, chunks)
        self.model = chunks[0].eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cfg, self.checkpoint, self.config_path = cfg, ckpt, cfg_path
        self.device = (torch.device("cuda", torch.cuda.current_device()) if cuda
                       else torch.device("cpu"))
        self.vocab_size = int(cfg.model.vocab_size)
        self.padded_vocab_size = padded
        self.v_local = padded // tp
        self.tp_group = group                                       # size 1 at TP1: no collectives

    @torch.no_grad()
    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, T] -> [b, T, v_local] float32 (causal; positions 0..T-1)."""
        ids = input_ids.to(self.device)
        b, T = ids.shape
        pos = torch.arange(T, device=self.device).unsqueeze(0).expand(b, T)
        return self.model(ids, pos, None).float()                 # [b, T, v/tp]


def true_vocab_size(backend: TeacherBackend, tokenizer) -> int:
    """The vocabulary the teacher's statistics (mean / std / logsumexp) and top-K run over: the
    tokenizer's ids ``[0, tokenizer.vocab_size)``. Output rows past it (an HF embedding padded to
    a multiple of 64 or 128, Megatron's TP padding) are never a token and never enter the top-K."""
    n = int(tokenizer.vocab_size)
    if not 0 < n <= backend.vocab_size:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} has {n} ids, the "
                         f"model has {backend.vocab_size} output rows: not this model's tokenizer")
    return n


MODEL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""``--dtype`` / ``TeacherConfig.dtype`` names -> the dtype a frozen model is loaded in."""


def resolve_device(name: str | None = None) -> torch.device:
    """The device a ``--device`` value names: "cuda" -> ``cuda:LOCAL_RANK``, "cuda:N", "cpu";
    None -> this rank's device (``parallel.rank_device``: cuda:LOCAL_RANK with CUDA, else cpu)."""
    from megatron_fusion.parallel import rank_device

    if name is None:
        return rank_device()
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is None:
            dev = rank_device()
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: must be cuda, cuda:N or cpu")
    return dev


def model_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``name`` in MODEL_DTYPES, or None / "auto": bf16 on CUDA, fp32 on CPU."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in MODEL_DTYPES:
        raise ValueError(f"--dtype {name}: must be one of auto, {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


@contextlib.contextmanager
def open_backend(kind: str, *, model_dir=None, gguf_file=None, checkpoint=None, tokenizer=None,
                 what: str = "teacher", device: str | torch.device | None = None,
                 dtype: str | None = None):
    """A frozen model for the precompute tools: yields ``(backend, tokenizer_spec, is_writer)``.

    ``kind="hf"``: a transformers model directory (or GGUF), one process, loaded in ``dtype``
    (``MODEL_DTYPES`` name; None/"auto": bf16 on CUDA, fp32 on CPU) onto ``device`` (None: this
    rank's, ``resolve_device``). ``kind="megatron"``: a megatron-fusion run, TP over all ranks of the
    current (torchrun) world, on ``cuda:LOCAL_RANK`` when CUDA is available (else cpu/gloo), in
    the run's ``train.precision`` unless ``dtype`` is given; only rank 0 writes.
    Process groups this opened are torn down on exit.
    """
    own_dist = False
    try:
        dev = resolve_device(str(device) if device is not None else None)
        if kind == "hf":
            if not model_dir:
                raise ValueError(f"--backend hf needs the {what} model directory")
            model_dir = Path(model_dir)
            spec = tokenizer or (model_dir / gguf_file if gguf_file else model_dir)
            yield (HFTeacherBackend(model_dir, gguf_file=gguf_file, device=dev,
                                    dtype=model_dtype(dtype, dev)), spec, True)
            return
        if not checkpoint:
            raise ValueError("--backend megatron needs --checkpoint RUN_DIR")
        if dev.type != ("cuda" if torch.cuda.is_available() else "cpu"):
            raise ValueError(f"--device {device}: --backend megatron runs on cuda:LOCAL_RANK when "
                             "CUDA is available and on cpu (gloo) only without it")
        if dtype not in (None, "auto"):
            model_dtype(dtype, dev)                           # validates the name
        import torch.distributed as dist

        from megatron_fusion.parallel import init_distributed, init_student_groups

        own_dist = not dist.is_initialized()
        # a world of one started here sets RANK / MASTER_PORT ...: put them back on release, so
        # that a later launch from this process does not inherit a port this process still holds
        env_keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        saved_env = {k: os.environ.get(k) for k in env_keys}
        init_distributed()
        init_student_groups(tp=dist.get_world_size())       # every rank: one TP group
        backend = MegatronTeacherBackend(checkpoint,
                                         precision=None if dtype in (None, "auto") else dtype)
        yield backend, tokenizer or backend.cfg.data.tokenizer, dist.get_rank() == 0
    finally:
        if own_dist:
            import torch.distributed as dist

            from megatron_fusion.parallel import destroy_student_groups

            destroy_student_groups()
            dist.destroy_process_group()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def backend_info(backend) -> dict:
    """Where the frozen model runs, for the tools' printed summary: device and weights' dtype."""
    w = next(backend.model.parameters())
    return {"device": str(w.device), "model_dtype": str(w.dtype).removeprefix("torch.")}

