"""Typed run configuration: dataclasses loaded from YAML recipes plus dotted overrides.

    cfg = load_config("configs/test/tiny_cpu.yaml", ["parallel.tp=2", "train.steps=10"])

Every field has a docstring-style comment; ``__post_init__`` checks what a field can check
alone, ``Config.validate_layout(world_size)`` checks what needs the world (divisibility).
Any problem raises ``ConfigError`` whose message is one line naming the field:
``config error: parallel.tp: 3 does not divide model.num_attention_heads=4``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from megatron_fusion.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message names the field."""

    def __init__(self, field_name: str, msg: str):
        super().__init__(f"config error: {field_name}: {msg}")
        self.field_name, self.detail = field_name, msg


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(field_name, msg)


@dataclass
class RunConfig:
    dir: str = "runs/tiny"
    """Run directory: checkpoints/, metrics.jsonl, wandb/. Re-using it resumes the run."""
    name: Optional[str] = None
    """Run name for W&B and the console (default: the run directory's name)."""


@dataclass
class ModelConfig:
    """Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA), as the 14B families to fuse are; with
    Llama-3.x RoPE scaling (``rope_scaling``) and Qwen3's q/k norms (``qk_layernorm``) as options
    (docs/models.md)."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """KV heads for GQA (None = MHA)."""
    kv_channels: Optional[int] = None
    """Per-head dimension (None = hidden_size / num_attention_heads). Mistral-Small-24B uses 128
    with hidden 5120 and 32 heads, so its attention width (4096) differs from the hidden size."""
    ffn_hidden_size: Optional[int] = None
    """MLP width (None = 4 * hidden, or 8/3 * hidden rounded to 64 with SwiGLU)."""
    vocab_size: int = 0
    """True vocabulary size. 0 = take it from the tokenizer (data.tokenizer)."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the embedding to a multiple of this * tp; padded columns never count."""
    seq_length: int = 128
    """Training sequence length (tokens per sample)."""
    max_position_embeddings: Optional[int] = None
    """RoPE table length (None = seq_length)."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm type."""
    norm_epsilon: float = 1e-5
    """Norm epsilon."""
    swiglu: bool = True
    """Gated SiLU MLP."""
    rotary_base: float = 10000.0
    """RoPE base (theta)."""
    rope_scaling: Optional[Literal["llama3"]] = None
    """RoPE frequency scaling: None = plain RoPE; 'llama3' = Llama-3.1/3.2/3.3's (HF
    ``rope_type: llama3``): wavelengths above original/low_freq_factor are divided by
    rope_scaling_factor, those below original/high_freq_factor kept, the band between blended."""
    rope_scaling_factor: float = 8.0
    """llama3 scaling: ``factor`` (8 for Llama-3.1, 32 for Llama-3.2-1B/3B)."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: ``low_freq_factor``."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: ``high_freq_factor`` (> rope_low_freq_factor)."""
    rope_original_max_position_embeddings: int = 8192
    """llama3 scaling: ``original_max_position_embeddings`` (the pre-training context)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head (head_dim weights, shared by the heads) before RoPE
    (Qwen3's q_norm / k_norm)."""
    tie_embeddings: bool = False
    """Share input embedding and output layer weights."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: 'auto' = Transformer Engine when it imports on a GPU, else local."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be > 0")
        _check(self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
               "model.hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads="
               f"{self.num_attention_heads} (set model.kv_channels for an explicit head dim)")
        if self.num_query_groups is not None:
            _check(self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups == 0,
                   "model.num_query_groups",
                   f"{self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}")
        _check(self.kv_channels is None or self.kv_channels > 0, "model.kv_channels", "must be > 0 or null")
        _check(self.vocab_size >= 0, "model.vocab_size", "must be >= 0")
        _check(self.make_vocab_size_divisible_by > 0, "model.make_vocab_size_divisible_by", "must be > 0")
        _check(self.norm_epsilon > 0, "model.norm_epsilon", "must be > 0")
        _check(not self.qk_layernorm or self.normalization == "RMSNorm", "model.qk_layernorm",
               "needs normalization=RMSNorm (the q/k norms are RMSNorms)")
        _check(self.rope_scaling_factor > 0, "model.rope_scaling_factor", "must be > 0")
        _check(self.rope_low_freq_factor > 0, "model.rope_low_freq_factor", "must be > 0")
        _check(self.rope_high_freq_factor > self.rope_low_freq_factor, "model.rope_high_freq_factor",
               f"{self.rope_high_freq_factor} must be > rope_low_freq_factor={self.rope_low_freq_factor}")
        _check(self.rope_original_max_position_embeddings > 0,
               "model.rope_original_max_position_embeddings", "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)
        return 4 * self.hidden_size

    def padded_vocab_size(self, tp: int) -> int:
        m = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / m) * m)


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (vocab and heads sharded)."""
    pp: int = 1
    """Pipeline-parallel size (layers split in stages)."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None = off."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""

    def __post_init__(self):
        _check(self.tp >= 1, "parallel.tp", "must be >= 1")
        _check(self.pp >= 1, "parallel.pp", "must be >= 1")
        _check(self.vpp is None or self.vpp >= 1, "parallel.vpp", "must be >= 1 or null")
        _check(self.vpp is None or self.pp > 1, "parallel.vpp", "needs parallel.pp > 1")
        _check(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel", "needs parallel.tp > 1")


@dataclass
class TrainConfig:
    steps: int = 20
    """Optimizer steps in total (a larger value on resume extends the run)."""
    micro_batch: int = 2
    """Samples per micro-batch per data-parallel rank."""
    global_batch: int = 4
    """Samples per optimizer step over all DP ranks (= micro * dp * accumulation)."""
    seed: int = 1234
    """Seed for init, data order and dropout."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter/compute dtype (fp32 on CPU; bf16 on GPU)."""
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    """FP8 through Transformer Engine (GPU only); None = off."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    """TE FP8 scaling recipe."""
    recompute: Optional[Literal["selective", "full"]] = None
    """Activation recomputation."""
    eval_interval: int = 0
    """Held-out evaluation every N steps (0 = only at the start and end)."""
    eval_batches: int = 4
    """Micro-batches per held-out evaluation."""

    def __post_init__(self):
        _check(self.steps >= 0, "train.steps", "must be >= 0")
        _check(self.micro_batch >= 1, "train.micro_batch", "must be >= 1")
        _check(self.global_batch >= 1, "train.global_batch", "must be >= 1")
        _check(self.eval_interval >= 0, "train.eval_interval", "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to min_lr at train.steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 0.0
    """Gradient-norm clip (0 = off). Megatron's clip asserts CUDA tensors: GPU only."""

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, lr]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0")


@dataclass
class DataConfig:
    train: str = ""
    """SFT JSONL (prompt/response or messages) or preference JSONL for stage fpo."""
    valid: list[str] = field(default_factory=list)
    """Held-out JSONL files (one per domain) for evaluation."""
    tokenizer: str = ""
    """Pivot tokenizer: a SentencePiece .model, a dir with tokenizer.json, or a .gguf file."""
    cache_dir: Optional[str] = None
    """Tokenised-data cache (default: <run.dir>/../.cache/data)."""
    overflow: Literal["truncate", "reject"] = "truncate"
    """Samples longer than seq_length: truncate (counted) or reject (error)."""
    synthetic: Optional[str] = None
    """Generate the data instead of reading it: 'demo' writes the demo tasks into the run dir."""
    packing: Literal["none", "greedy"] = "none"
    """Sequence packing (docs/methods.md §10): 'none' pads every sample to model.seq_length;
    'greedy' packs each step's samples into rows of seq_length slots by first-fit-decreasing,
    every sample its own segment (positions from 0, no attention across samples);
    train.micro_batch then counts rows (fpo: pairs' rows, 2 x micro_batch). Not with
    parallel.vpp."""

    def __post_init__(self):
        _check(self.packing in ("none", "greedy"), "data.packing",
               f"{self.packing!r} is not one of ['none', 'greedy']")


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every N steps (0 = only at the end). A run always saves when it ends."""
    resume: bool = True
    """Resume from the latest checkpoint in <run.dir>/checkpoints when one exists."""
    load: Optional[str] = None
    """Initial weights (a Megatron checkpoint dir, e.g. from tools/convert_hf_to_megatron.py)."""
    keep: int = 2
    """Checkpoints kept (older ones deleted after a successful save)."""


@dataclass
class LoggingConfig:
    interval: int = 1
    """Log every N steps."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode: offline needs no account; online on a cluster."""
    wandb_project: str = "megatron-fusion"
    """W&B project."""
    wandb_entity: Optional[str] = None
    """W&B entity (team)."""
    progress: bool = True
    """Rank-0 progress bar."""


@dataclass
class TeacherConfig:
    name: str = ""
    """Teacher name (also in top-K shard headers)."""
    tokenizer: str = ""
    """The teacher's own tokenizer."""
    topk_dir: Optional[str] = None
    """Offline top-K shards (tools/precompute_teacher_topk.py)."""
    source: Literal["offline", "online"] = "offline"
    """Where the top-K comes from."""
    checkpoint: Optional[str] = None
    """Teacher weights (online, or for precompute)."""
    backend: Literal["megatron", "hf"] = "megatron"
    """Online teacher model: megatron = a megatron-fusion run at `checkpoint`, sharded at `tp`;
    hf = a transformers model dir (or a *.gguf file in one) at `checkpoint`, full model on every
    rank (vocab-sharded logits at tp > 1); tokenizer default: the run's / the model dir's."""
    ranks: int = 0
    """Online: ranks of this teacher's inference group."""
    tp: int = 1
    """Online: the teacher's tensor-parallel size."""
    weight: float = 1.0
    """Static weight in the uniform mix (normalised over teachers)."""
    model: Optional[dict] = None
    """Teacher architecture (same keys as `model`), for `plan` and the Megatron backend."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Online hf teacher: the dtype the model is loaded and run in on its rank's device
    (cuda:LOCAL_RANK, or cpu without CUDA); auto = bf16 on CUDA, fp32 on CPU. The megatron
    backend runs in the run's train.precision (leave auto)."""
    vocab_match: Optional[str] = None
    """fuse.loss=hybrid: the cached teacher -> pivot vocabulary match (methods.md §9,
    teachers/vocab_match.py). None = <run.dir>/vocab_match/<name>.vmap. A missing file is built
    from `tokenizer` and data.tokenizer and written there; a file made for other tokenizers
    stops the run naming it and the header field."""

    def __post_init__(self):
        _check(bool(self.name), "fuse.teachers[].name", "must be set")
        _check(self.dtype in ("auto", "bf16", "fp16", "fp32"), f"teacher {self.name}.dtype",
               f"must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        _check(self.dtype == "auto" or self.backend == "hf", f"teacher {self.name}.dtype",
               "is for backend hf (a megatron teacher runs in its run's train.precision)")
        _check(self.tp >= 1, f"teacher {self.name}.tp", "must be >= 1")
        _check(self.ranks >= 0, f"teacher {self.name}.ranks", "must be >= 0")
        _check(self.source != "online" or self.ranks >= self.tp, f"teacher {self.name}.ranks",
               f"an online teacher needs ranks >= tp={self.tp}")


@dataclass
class FuseConfig:
    teachers: list[TeacherConfig] = field(default_factory=list)
    """Source models. Pairwise fusion = a config with one teacher per run."""
    lambda_ce: float = 1.0
    """Weight of the pivot CE."""
    lambda_uld: float = 1.0
    """Weight of the ULD term (InfiFusion)."""
    lambda_gld: float = 0.5
    """Weight of the GLD term (InfiGFusion)."""
    weighting: Literal["uniform", "minCE", "avgCE"] = "uniform"
    """How teachers are mixed."""
    k: int = 10
    """Top-K per position."""
    temperature: float = 1.0
    """ULD softmax temperature."""
    zscore: Literal["full", "topk"] = "full"
    """Scope of the logit standardisation."""
    prefetch: int = 2
    """Online teachers: batches computed ahead of the student."""
    timeout_s: float = 300.0
    """Online teachers: a batch not received within this time fails the run."""
    min_aligned_fraction: float = 0.8
    """Warn when a teacher aligns fewer pivot response positions than this fraction (offline:
    at start, from its shards' stored aligned/response positions; online: the teacher group,
    over what it has computed, checked after every step)."""
    min_aligned_fraction_hard: float = 0.2
    """Stop (naming the teacher) when its aligned fraction falls under this floor: its
    distillation terms would cover almost nothing. 0 = never stop."""
    eps: float = 1e-6
    """Standardisation epsilon of the teacher top-K (methods.md §2): online teachers use it;
    offline shards must have been made with it (their meta.eps is checked)."""
    alignment: Literal["offset", "offset_next", "mined"] = "offset"
    """Teacher -> pivot position alignment (methods.md §1): online teachers use it; offline
    shards must have been made with it (their meta.alignment is checked)."""
    loss: Literal["uld", "hybrid"] = "uld"
    """Distillation term per teacher: uld = ULD on the z-scored top-K (methods.md §2, the
    paper's); hybrid = KL on the teacher's top-K tokens that the pivot vocabulary shares, ULD on
    the rest (methods.md §9). hybrid replaces lambda_uld * L_ULD by the hybrid term (weights
    lambda_matched / lambda_unmatched); CE and GLD are unchanged. Needs teacher log-probs
    (offline shards that carry them, or online teachers) and each teacher's `tokenizer`."""
    tail_bucket: bool = False
    """hybrid: the probability mass outside the matched tokens as one more KL bucket on both
    sides (methods.md §9)."""
    lambda_matched: Union[float, Literal["adaptive"]] = 1.0
    """hybrid: weight w_M of the matched KL (+ tail bucket), >= 0; adaptive = GOLD's rule per
    teacher, w_M = matched teacher tokens / teacher vocab size (needs lambda_unmatched: adaptive)."""
    lambda_unmatched: Union[float, Literal["adaptive"]] = 1.0
    """hybrid: weight w_U of the ULD over the unmatched remainder, >= 0; adaptive = 1 - w_M."""
    grad_diagnostics: int = 0
    """Every this many steps (and at step 1; 0 = never) report each loss term's gradient at the
    logits: ``grad/ce``, ``grad/uld`` (or
    ``grad/hybrid``), ``grad/gld`` = the L2 norm over the step's logits of d(lambda * term)/d logits
    (each term as it enters the objective), ``grad/<term>_over_ce`` and ``grad/cos_<term>_ce``
    (cosine with the CE's gradient). Shows whether a distillation term that is small in the loss
    dominates the update (docs/methods.md §4). Costs one more backward through the logits-sized
    loss Function per term on those steps (not through the model; about 2x a step on CPU)."""

    def __post_init__(self):
        _check(self.k >= 1, "fuse.k", "must be >= 1")
        _check(0.0 <= self.min_aligned_fraction <= 1.0, "fuse.min_aligned_fraction",
               f"must be in [0, 1], got {self.min_aligned_fraction}")
        _check(0.0 <= self.min_aligned_fraction_hard <= self.min_aligned_fraction,
               "fuse.min_aligned_fraction_hard",
               f"must be in [0, fuse.min_aligned_fraction={self.min_aligned_fraction}], "
               f"got {self.min_aligned_fraction_hard}")
        _check(self.eps > 0, "fuse.eps", "must be > 0")
        _check(self.alignment in ("offset", "offset_next", "mined"), "fuse.alignment",
               f"must be offset, offset_next or mined, got {self.alignment!r}")
        _check(self.temperature > 0, "fuse.temperature", "must be > 0")
        for n in ("lambda_ce", "lambda_uld", "lambda_gld"):
            _check(getattr(self, n) >= 0, f"fuse.{n}", "must be >= 0")
        _check(self.loss in ("uld", "hybrid"), "fuse.loss",
               f"must be uld or hybrid, got {self.loss!r}")
        _check(isinstance(self.grad_diagnostics, int) and not isinstance(self.grad_diagnostics, bool)
               and self.grad_diagnostics >= 0, "fuse.grad_diagnostics",
               f"must be an integer >= 0 (every N steps; 0 = off), got {self.grad_diagnostics!r}")
        _check(isinstance(self.tail_bucket, bool), "fuse.tail_bucket",
               f"must be true or false, got {self.tail_bucket!r}")
        _check(not self.tail_bucket or self.loss == "hybrid", "fuse.tail_bucket",
               "is part of fuse.loss=hybrid (fuse.loss is uld)")
        for n in ("lambda_matched", "lambda_unmatched"):
            v = getattr(self, n)
            _check(v == "adaptive" or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                       and v >= 0), f"fuse.{n}",
                   f"must be a number >= 0 or adaptive, got {v!r}")
        _check((self.lambda_matched == "adaptive") == (self.lambda_unmatched == "adaptive"),
               "fuse.lambda_unmatched", "adaptive sets both hybrid weights (w_U = 1 - w_M): set "
               "fuse.lambda_matched and fuse.lambda_unmatched both to adaptive, or both to numbers")
        _check(self.loss != "hybrid" or self.temperature == 1.0, "fuse.temperature",
               "is ULD's softmax temperature (methods.md §2); fuse.loss=hybrid uses the "
               "teachers' probabilities at T = 1")
        if self.loss == "hybrid":
            for t in self.teachers:
                _check(bool(t.tokenizer), f"teacher {t.name}.tokenizer",
                       "must be set for fuse.loss=hybrid (the vocabulary match is built from it)")
        names = [t.name for t in self.teachers]
        _check(len(names) == len(set(names)), "fuse.teachers", f"duplicate teacher names {names}")


@dataclass
class FPOConfig:
    beta: float = 2.5
    """DPO temperature beta."""
    ref_offset: float = 5.0
    """Clip delta around the pivot reference log-prob."""
    fusion: Literal["mean", "max_margin"] = "max_margin"
    """How source log-probs are fused."""
    sources_logprobs: list[str] = field(default_factory=list)
    """Offline source log-prob files (tools/precompute_source_logprobs.py), one per source."""
    source_tokenizers: list[str] = field(default_factory=list)
    """The sources' own tokenizers, in the order of sources_logprobs; each file's
    source_tokenizer_hash is checked against it before step 1. Empty = take each source's
    tokenizer from fuse.teachers by the name in the file's header (unchecked when none)."""
    ref_logprobs: Optional[str] = None
    """Pivot reference log-prob file. None = <run.dir>/ref_logprobs/pivot_ref.logp, computed by a
    forward-only pass over the training pairs before step 1 and read back on resume; a given
    path is read when it exists, else computed and written there."""
    valid_preference: Optional[str] = None
    """Held-out preference JSONL: eval/pref_accuracy (fraction of pairs with
    ℓ_θ(chosen) > ℓ_θ(rejected)) before and after training, and every train.eval_interval."""

    def __post_init__(self):
        _check(self.beta > 0, "fpo.beta", "must be > 0")
        _check(self.ref_offset >= 0, "fpo.ref_offset", "must be >= 0")


@dataclass
class Config:
    stage: Literal["sft", "fuse", "fpo"] = "sft"
    """sft = CE only; fuse = CE + ULD + GLD; fpo = InfiFPO."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    fpo: FPOConfig = field(default_factory=FPOConfig)

    def __post_init__(self):
        _check(self.stage != "fuse" or len(self.fuse.teachers) > 0, "fuse.teachers",
               "stage 'fuse' needs at least one teacher")

    # --- checks that need the world size -------------------------------------------------
    def online_teachers(self) -> list[TeacherConfig]:
        """The teachers that run as ranks of this launch (stage fuse only), in config order."""
        return [t for t in self.fuse.teachers if t.source == "online"] if self.stage == "fuse" else []

    def online_teacher_ranks(self) -> int:
        """Launch ranks taken by online teacher groups (they come after the student's)."""
        return sum(t.ranks for t in self.online_teachers())

    def student_world_size(self, world_size: int) -> int:
        """Ranks left for the student after online teacher groups take theirs."""
        return world_size - self.online_teacher_ranks()

    def data_parallel_size(self, world_size: int) -> int:
        return self.student_world_size(world_size) // (self.parallel.tp * self.parallel.pp)

    def validate_layout(self, world_size: int) -> int:
        """Check divisibility for ``world_size`` ranks; return the DP size."""
        p, m, t = self.parallel, self.model, self.train
        student = self.student_world_size(world_size)
        _check(m.num_attention_heads % p.tp == 0, "parallel.tp",
               f"{p.tp} does not divide model.num_attention_heads={m.num_attention_heads}")
        groups = m.num_query_groups or m.num_attention_heads
        _check(groups % p.tp == 0, "parallel.tp",
               f"{p.tp} does not divide model.num_query_groups={groups}")
        stages = p.pp * (p.vpp or 1)
        _check(m.num_layers % stages == 0, "parallel.pp",
               f"model.num_layers={m.num_layers} is not divisible by pp*vpp = {stages}")
        _check(m.ffn_size % p.tp == 0, "parallel.tp", f"{p.tp} does not divide ffn size {m.ffn_size}")
        _check(not p.sequence_parallel or m.seq_length % p.tp == 0, "parallel.sequence_parallel",
               f"model.seq_length={m.seq_length} must be divisible by tp={p.tp}")
        _check(student >= 1, "fuse.teachers", f"online teachers take all {world_size} ranks")
        _check(student % (p.tp * p.pp) == 0, "parallel.tp",
               f"student world size {student} is not divisible by tp*pp = {p.tp}*{p.pp}")
        dp = student // (p.tp * p.pp)
        _check(t.global_batch % (t.micro_batch * dp) == 0, "train.global_batch",
               f"{t.global_batch} is not divisible by micro_batch*dp = {t.micro_batch}*{dp}")
        if p.vpp is not None:
            n_micro = t.global_batch // (t.micro_batch * dp)
            _check(n_micro % p.pp == 0, "parallel.vpp",
                   f"interleaved schedule needs micro-batches ({n_micro}) divisible by pp={p.pp}")
        return dp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading --------------------------------------------------------------------------------

def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def _list_index(items: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(key, f"'{part}' is not an index of a list of {len(items)}")
    return int(part)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict.

    A numeric part indexes a list: ``fuse.teachers.1.ranks=16`` sets the second teacher's ranks.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            if isinstance(node, list):  # a list item by index: fuse.teachers.0.ranks=8
                node = node[_list_index(node, p, key)]
            else:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
            if not isinstance(node, (dict, list)):
                raise ConfigError(key, f"'{p}' is not a section")
        last = parts[-1]
        node[_list_index(node, last, key) if isinstance(node, list) else last] = _parse_scalar(value)
    return raw


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for arm in inner:          # the first arm that takes the value (number, then a word)
            try:
                return _coerce(value, arm, name)
            except ConfigError as e:
                errors.append(e.detail)
        raise ConfigError(name, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(name, f"{value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(name, f"expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {type(value).__name__}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return str(value)
    return value


def build_section(cls, raw: Any, prefix: str):
    """One config dataclass ``cls`` from a YAML mapping; errors name ``prefix.key``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    return build_section(Config, raw, "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe, apply dotted overrides, build and validate the typed config."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", f"file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError("--config", f"{p}: top level must be a mapping")
    raw = apply_overrides(raw, list(overrides or []))
    return config_from_dict(raw)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
