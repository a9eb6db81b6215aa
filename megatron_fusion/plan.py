"""Plan a cluster run before submitting it: layout checks, parameter counts, per-GPU memory.

    megatron-fusion plan --config configs/recipes/fuse_14b.yaml --nodes 4 --gpus-per-node 8 \\
                         [--gpu-mem-gb 80] [--teacher-nodes 2] [dotted.key=value ...]

CPU only, nothing is allocated. Exit 0: every GPU fits; 1: something does not fit (a layout
that fits is suggested, as a command line to re-check); 2: configuration error (one line naming
the field).

Placement (what megatron_fusion.train and launch/*.sh do): global ranks [0, S) are the student,
online teacher groups follow in config order, each on ``ranks`` consecutive ranks; torchrun gives
every node ``gpus_per_node`` consecutive ranks, so teachers own the last nodes.

Memory model, per GPU, in bytes (s seq, b micro-batch, h hidden, a heads, g KV heads, d head dim,
q = a*d, k = g*d, F ffn, V padded vocab, L layers, t tp, p pp, P parameters on this GPU):
  weights   2P (bf16)              grads 4P (fp32 main grads, Megatron's default for bf16)
  optimizer 12P (fp32 main params + Adam m, v); with the distributed optimizer 12P / dp
  activations per layer and micro-batch: Korthikanti et al. 2022 (arXiv 2205.05198, Table 2)
  generalised to GQA, SwiGLU and q != h (see ``layer_activation_bytes``); a 1F1B first stage
  keeps min(p, micro-batches) micro-batches in flight (x (1 + (p-1)/(p*vpp)) interleaved).
  logits shard (last stage) s*b*V/t * (2 bf16 + 4 fp32 CE + 2 grad [+ 4 fusion losses])
  teacher top-K buffers (last stage) and a fixed runtime reserve (CUDA context, NCCL, cuBLAS).
A GPU fits when the total is at most ``USABLE_FRACTION`` of its memory (allocator fragmentation).

Balance (``teacher_balance``): each online teacher's forward compute per step on its busiest
replica over the student's training compute per step; a replica serves whole student DP ranks,
so it prints the replicas (ranks) that hide each teacher and says ``balanced`` when all do.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

from megatron_fusion.config import Config, ConfigError, ModelConfig, build_section

GIB = 2**30
RUNTIME_RESERVE_GIB = 4.0
"""CUDA context (~0.6 GiB), NCCL buffers and cuBLAS/TE workspaces, per GPU."""
USABLE_FRACTION = 0.90
"""Share of the GPU memory a plan may use; the rest absorbs caching-allocator fragmentation."""
RECOMPUTE_LEVELS = (None, "selective", "full")


# --- parameters ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamCount:
    """Parameters of a Llama-style decoder, split the way TP/PP shard them."""

    per_layer: int          # one transformer layer (attention + MLP + its norms)
    layer_norms: int        # the part of per_layer that TP replicates (norm weights, q/k norms)
    num_layers: int
    embedding: int          # V * h
    output: int             # V * h, 0 when tied
    final_norm: int

    @property
    def total(self) -> int:
        return self.per_layer * self.num_layers + self.embedding + self.output + self.final_norm

    @property
    def matmul_per_token(self) -> int:
        """Weights a token is multiplied with (everything but the embedding lookup and norms)."""
        return (self.per_layer - self.layer_norms) * self.num_layers + (self.output or self.embedding)


def param_count(m: ModelConfig, vocab: Optional[int] = None) -> ParamCount:
    """Exact parameter count: GQA attention (+ qkv bias, + q/k norms), SwiGLU/GeLU MLP without
    biases, norms. Equal to the HF model's for the converted families (tests/test_plan.py builds
    Llama-3.1-8B, Qwen3-8B and Qwen3-14B from their public configs on the meta device).

    ``vocab`` defaults to the true vocabulary (the Hugging Face count); pass
    ``m.padded_vocab_size(tp)`` for what Megatron allocates.
    """
    h, q, k, f = m.hidden_size, m.num_attention_heads * m.head_dim, _kv_heads(m) * m.head_dim, m.ffn_size
    attn = h * (q + 2 * k) + q * h + ((q + 2 * k) if m.add_qkv_bias else 0)
    mlp = h * f * (2 if m.swiglu else 1) + f * h
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    qk_norms = 2 * m.head_dim if m.qk_layernorm else 0      # Qwen3: one head_dim RMSNorm each for q, k
    v = m.vocab_size if vocab is None else vocab
    replicated = 2 * norm + qk_norms                        # every TP rank holds these whole
    return ParamCount(per_layer=attn + mlp + replicated, layer_norms=replicated, num_layers=m.num_layers,
                      embedding=v * h, output=0 if m.tie_embeddings else v * h, final_norm=norm)


def _kv_heads(m: ModelConfig) -> int:
    return m.num_query_groups or m.num_attention_heads


def stage_params(m: ModelConfig, tp: int, pp: int) -> tuple[int, int]:
    """Parameters held by one GPU of the first and of the last pipeline stage (padded vocab)."""
    pc = param_count(m, m.padded_vocab_size(tp))
    layers = (pc.per_layer - pc.layer_norms) * (m.num_layers // pp) // tp + pc.layer_norms * (m.num_layers // pp)
    emb = pc.embedding // tp
    out = (pc.output or pc.embedding) // tp  # tied + pp > 1: Megatron keeps a copy on the last stage
    if pp == 1:
        both = layers + emb + pc.output // tp + pc.final_norm
        return both, both
    return layers + emb, layers + out + pc.final_norm


# --- activations -----------------------------------------------------------------------------

def layer_activation_bytes(m: ModelConfig, *, seq: int, micro: int, tp: int, sp: bool,
                           recompute: Optional[str], flash: bool = True, dropout: bool = False,
                           elem_bytes: int = 2) -> int:
    """Activation bytes one transformer layer keeps for backward, for one micro-batch.

    Korthikanti et al. count, per layer, 34*s*b*h + 5*a*s^2*b bytes for a GPT (MHA, 4h GeLU MLP,
    dropout, unfused softmax), of which 10*s*b*h are replicated over TP without sequence
    parallelism. Term by term, in elements unless noted:
      sequence-sharded (/t only with SP): 2 norm inputs + QKV input + fc1 input = 4sbh;
                                          2 dropout masks = 2sbh bytes
      TP-sharded (/t): Q, K, V = sb(q+2k); output-projection input sbq;
                       fc1 output + activation output = sbF*(3 with SwiGLU, 2 with GeLU)
      core attention (/t): unfused: softmax output a*s^2*b (+ dropout mask a*s^2*b bytes + dropout
                           output a*s^2*b); flash: only the fp32 log-sum-exp, 4*a*s*b bytes.
    Selective recompute drops the unfused core-attention term; full recompute keeps the layer
    input only (s*b*h, /t with SP). With q = k = h, F = 4h, GeLU, dropout and unfused attention
    this is exactly the paper's formula.
    """
    s, b, h, a = seq, micro, m.hidden_size, m.num_attention_heads
    q, k, f = a * m.head_dim, _kv_heads(m) * m.head_dim, m.ffn_size
    seq_div = tp if sp else 1
    if recompute == "full":
        return s * b * h * elem_bytes // seq_div
    seq_part = s * b * 4 * h * elem_bytes + (2 * s * b * h if dropout else 0)
    tp_part = s * b * ((q + 2 * k) + q + f * (3 if m.swiglu else 2)) * elem_bytes
    if flash:
        core = 4 * a * s * b
    elif recompute == "selective":
        core = 0
    else:
        core = a * s * s * b * (elem_bytes + ((1 + elem_bytes) if dropout else 0))
    return seq_part // seq_div + (tp_part + core) // tp


# --- memory of one student GPU ---------------------------------------------------------------

@dataclass
class Layout:
    """The knobs the fit search varies."""

    tp: int
    pp: int
    vpp: Optional[int]
    sp: bool
    distributed_optimizer: bool
    recompute: Optional[str]
    micro_batch: int

    @classmethod
    def of(cls, cfg: Config) -> "Layout":
        p = cfg.parallel
        return cls(p.tp, p.pp, p.vpp, p.sequence_parallel, p.distributed_optimizer,
                   cfg.train.recompute, cfg.train.micro_batch)

    def overrides(self) -> list[str]:
        def y(v):
            return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.vpp={y(self.vpp)}",
                f"parallel.sequence_parallel={y(self.sp)}",
                f"parallel.distributed_optimizer={y(self.distributed_optimizer)}",
                f"train.recompute={y(self.recompute)}", f"train.micro_batch={self.micro_batch}"]


@dataclass
class StudentMemory:
    stage: str
    params: int
    weights: float
    grads: float
    optimizer: float
    optimizer_no_distopt: float
    optimizer_distopt: float
    activations: dict            # recompute level -> bytes
    logits: float
    topk: float
    reserve: float

    def total(self, recompute: Optional[str]) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations[recompute]
                + self.logits + self.topk + self.reserve)


def student_memory(cfg: Config, lay: Layout, dp: int) -> list[StudentMemory]:
    """Per-GPU bytes of the first and (if pp > 1) the last pipeline stage."""
    m, t = cfg.model, cfg.train
    e = 4 if t.precision == "fp32" else 2
    seqs = 2 if cfg.stage == "fpo" else 1           # an FPO micro-batch holds chosen + rejected
    b = lay.micro_batch * seqs
    s = m.seq_length
    n_micro = t.global_batch // (lay.micro_batch * dp)
    flash = m.transformer_impl != "local"           # TE / fused attention on the GPU
    first_params, last_params = stage_params(m, lay.tp, lay.pp)
    layers = m.num_layers // lay.pp
    seq_div = lay.tp if lay.sp else 1
    vp = m.padded_vocab_size(lay.tp)
    out = []
    stages = [("first", first_params, True, False), ("last", last_params, False, True)]
    if lay.pp == 1:
        stages = [("only", first_params, True, True)]
    for name, params, is_first, is_last in stages:
        weights = params * e
        if t.fp8 is not None:  # TE caches an fp8 copy and its transpose of every linear weight
            weights += 2 * _linear_params(m, lay.tp, layers)
        grads = params * 4
        opt_full = params * (8 if t.precision == "fp32" else 12)
        opt_dist = opt_full / dp
        in_flight = min(lay.pp, n_micro) if is_first and lay.pp > 1 else 1
        if lay.vpp and is_first:
            in_flight *= 1 + (lay.pp - 1) / (lay.pp * lay.vpp)
        acts = {}
        for level in RECOMPUTE_LEVELS:
            kw = dict(seq=s, micro=b, tp=lay.tp, sp=lay.sp, flash=flash, elem_bytes=e)
            per_layer = layer_activation_bytes(m, recompute=level, **kw)
            total = per_layer * layers * in_flight
            if level == "full":  # backward re-runs one layer: its activations live meanwhile
                total += layer_activation_bytes(m, recompute="selective", **kw)
            if is_first:
                total += s * b * m.hidden_size * e / seq_div * in_flight   # embedding output
            acts[level] = total
        logits = topk = 0.0
        if is_last:
            per = 2 + 4 + 2 + (4 if cfg.stage == "fuse" else 0)
            logits = s * b * vp / lay.tp * per
            if cfg.stage == "fuse":
                topk = _topk_bytes(cfg, lay, dp, b)
        out.append(StudentMemory(
            stage=name, params=params, weights=weights, grads=grads,
            optimizer=opt_dist if lay.distributed_optimizer else opt_full,
            optimizer_no_distopt=opt_full, optimizer_distopt=opt_dist, activations=acts,
            logits=logits, topk=topk, reserve=RUNTIME_RESERVE_GIB * GIB))
    return out


def _linear_params(m: ModelConfig, tp: int, layers: int) -> int:
    pc = param_count(m)
    return (pc.per_layer - pc.layer_norms) * layers // tp


def _topk_bytes(cfg: Config, lay: Layout, dp: int, b: int) -> float:
    """Teacher top-K of one optimizer step on this DP rank (x (1 + prefetch) when online), plus
    the student's gathered K*tp candidates (fp32 value + int64 id, with their gradient)."""
    f, s = cfg.fuse, cfg.model.seq_length
    # shard format 4 (methods.md §6): int32 id + 16-bit log-prob code per K, fp32 (d, c), aligned flag
    per_token_teacher = f.k * (4 + 2) + 8 + 1
    samples = cfg.train.global_batch // dp
    depth = 1 + (f.prefetch if any(tc.source == "online" for tc in f.teachers) else 0)
    teacher = samples * s * len(f.teachers) * per_token_teacher * depth
    student = s * b * f.k * lay.tp * (4 + 8) * 2
    return float(teacher + student)


# --- teachers --------------------------------------------------------------------------------

@dataclass
class TeacherPlan:
    name: str
    model: ModelConfig
    source: str
    ranks: int
    tp: int
    params: ParamCount
    weights: float = 0.0
    activations: float = 0.0
    kv: float = 0.0
    logits: float = 0.0
    reserve: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.activations + self.kv + self.logits + self.reserve


def teacher_models(cfg: Config) -> list[ModelConfig]:
    """Each teacher's ModelConfig from its ``model`` dict (seq_length defaults to the pivot's)."""
    models = []
    for i, tc in enumerate(cfg.fuse.teachers):
        where = f"fuse.teachers.{i}.model"
        if not tc.model:
            raise ConfigError(where, f"teacher {tc.name!r} needs its architecture for plan")
        raw = {"seq_length": cfg.model.seq_length, **tc.model}
        tm = build_section(ModelConfig, raw, where)
        if tm.vocab_size <= 0:
            raise ConfigError(f"{where}.vocab_size", "plan needs the true vocabulary size")
        models.append(tm)
    return models


def forward_flops_per_token(m: ModelConfig, seq: int) -> float:
    """Forward FLOPs per token: 2 per matmul weight + causal attention (QK^T and AV)."""
    return 2 * param_count(m).matmul_per_token + 2 * m.num_layers * seq * m.num_attention_heads * m.head_dim


def split_teacher_ranks(cfg: Config, total: int) -> list[int]:
    """Spread ``total`` ranks over the online teachers in proportion to their forward FLOPs, each
    a multiple of its tp (offline teachers get 0). Raises ConfigError when it cannot be done."""
    models = teacher_models(cfg)
    online = [i for i, tc in enumerate(cfg.fuse.teachers) if tc.source == "online"]
    ranks = [0] * len(models)
    if not online:
        if total:
            raise ConfigError("--teacher-nodes", "no teacher has source: online")
        return ranks
    tps = {i: cfg.fuse.teachers[i].tp for i in online}
    if total < sum(tps.values()):
        raise ConfigError("--teacher-nodes", f"{total} ranks cannot hold the online teachers' tp "
                          f"({', '.join(str(v) for v in tps.values())})")
    work = {i: forward_flops_per_token(models[i], cfg.model.seq_length) for i in online}
    ideal = {i: total * work[i] / sum(work.values()) for i in online}
    for i in online:
        ranks[i] = max(1, int(ideal[i] // tps[i])) * tps[i]
    while sum(ranks) > total:  # give back from the most over-served teacher that can spare a group
        i = max((j for j in online if ranks[j] > tps[j]), key=lambda j: ranks[j] / ideal[j])
        ranks[i] -= tps[i]
    while sum(ranks) < total:  # hand out to the most starved teacher whose tp fits what is left
        left = total - sum(ranks)
        fit = [j for j in online if tps[j] <= left]
        if not fit:
            raise ConfigError("--teacher-nodes", f"{left} of {total} teacher ranks cannot be given to "
                              "a teacher group (tp sizes do not add up)")
        i = max(fit, key=lambda j: ideal[j] / ranks[j])
        ranks[i] += tps[i]
    return ranks


def teacher_plans(cfg: Config) -> list[TeacherPlan]:
    plans = []
    b = cfg.train.micro_batch * (2 if cfg.stage == "fpo" else 1)
    for tc, tm in zip(cfg.fuse.teachers, teacher_models(cfg)):
        plan = TeacherPlan(tc.name, tm, tc.source, tc.ranks, tc.tp, param_count(tm))
        if tc.source == "online":
            _fill_teacher_memory(plan, tm, tc.tp, b)
        plans.append(plan)
    return plans


def _fill_teacher_memory(plan: TeacherPlan, tm: ModelConfig, tp: int, b: int) -> None:
    """Frozen bf16 weights, one layer's forward working set, K/V of every layer (as a backend
    with a KV cache holds them), full-vocab logits in bf16 + fp32 for the z-score and top-K."""
    s, h = tm.seq_length, tm.hidden_size
    q, k, f = tm.num_attention_heads * tm.head_dim, _kv_heads(tm) * tm.head_dim, tm.ffn_size
    first, _ = stage_params(tm, tp, 1)
    plan.tp = tp
    plan.weights = first * 2
    plan.activations = s * b * (2 * h + (q + 2 * k + q + f * (3 if tm.swiglu else 2)) / tp) * 2
    plan.kv = 2 * tm.num_layers * s * b * k / tp * 2
    plan.logits = s * b * tm.padded_vocab_size(tp) / tp * (2 + 4)
    plan.reserve = RUNTIME_RESERVE_GIB * GIB


def _teacher_tp_ok(tm: ModelConfig, tp: int) -> bool:
    return tm.num_attention_heads % tp == 0 and _kv_heads(tm) % tp == 0 and tm.ffn_size % tp == 0


# --- checks, fit and search ------------------------------------------------------------------

@dataclass
class Plan:
    cfg: Config
    nodes: int
    gpus_per_node: int
    gpu_mem: float
    world: int
    student_ranks: int
    dp: int
    layout: Layout
    student: list[StudentMemory]
    teachers: list[TeacherPlan]
    notes: list[str] = field(default_factory=list)

    @property
    def budget(self) -> float:
        return self.gpu_mem * USABLE_FRACTION

    @property
    def student_peak(self) -> float:
        return max(sm.total(self.layout.recompute) for sm in self.student)

    @property
    def student_fits(self) -> bool:
        return self.student_peak <= self.budget

    @property
    def teachers_fit(self) -> bool:
        return all(tp.total <= self.budget for tp in self.teachers if tp.source == "online")

    @property
    def fits(self) -> bool:
        return self.student_fits and self.teachers_fit


def check_layout(cfg: Config, nodes: int, gpus_per_node: int) -> int:
    """All divisibility and placement checks; returns the student's DP size. Also what the
    launcher runs on every node, so it needs no sizes: a teacher's heads are checked against its
    tp when its ``model`` is given (else the teacher's checkpoint is, when it loads)."""
    if nodes < 1:
        raise ConfigError("--nodes", "must be >= 1")
    if gpus_per_node < 1:
        raise ConfigError("--gpus-per-node", "must be >= 1")
    p = cfg.parallel
    for i, tc in enumerate(cfg.fuse.teachers):
        if tc.source != "online":
            continue
        where = f"fuse.teachers.{i}"
        tm = build_section(ModelConfig, {"seq_length": cfg.model.seq_length, **tc.model},
                    f"{where}.model") if tc.model else None
        if tm is not None and not _teacher_tp_ok(tm, tc.tp):
            raise ConfigError(f"{where}.tp", f"{tc.tp} must divide the teacher's attention heads "
                              f"({tm.num_attention_heads}), KV heads ({_kv_heads(tm)}) and ffn ({tm.ffn_size})")
        if gpus_per_node % tc.tp != 0:
            raise ConfigError(f"{where}.tp", f"{tc.tp} must divide gpus per node ({gpus_per_node})")
        if tc.ranks % tc.tp != 0:
            raise ConfigError(f"{where}.ranks", f"{tc.ranks} is not a multiple of the teacher's tp={tc.tp}")
    world = nodes * gpus_per_node
    dp = cfg.validate_layout(world)
    if gpus_per_node % p.tp != 0:
        raise ConfigError("parallel.tp", f"{p.tp} must divide gpus per node ({gpus_per_node}): "
                          "a TP group stays inside one node's NVLink domain")
    return dp


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_mem_gib: float) -> Plan:
    if cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size", "plan needs the true vocabulary size (not 0)")
    teacher_models(cfg)                   # every teacher's architecture, for the estimates
    dp = check_layout(cfg, nodes, gpus_per_node)
    world = nodes * gpus_per_node
    student_ranks = cfg.student_world_size(world)
    lay = Layout.of(cfg)
    plan = Plan(cfg, nodes, gpus_per_node, gpu_mem_gib * GIB, world, student_ranks, dp, lay,
                student_memory(cfg, lay, dp), teacher_plans(cfg))
    teacher_ranks = world - student_ranks
    if teacher_ranks % gpus_per_node:
        plan.notes.append(f"online teachers take {teacher_ranks} ranks, not whole nodes: "
                          f"one node is shared by the student and a teacher group")
    return plan


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: Config, nodes: int, gpus_per_node: int, gpu_mem_gib: float
           ) -> Optional[tuple[list[str], Plan]]:
    """The cheapest layout that fits, as overrides. Preference, in this order: less recompute
    (full costs ~1/3 more compute), smaller tp*pp (less communication and bubble), smaller pp,
    larger micro-batch (never above the configured one), the distributed optimizer on."""
    m, t = cfg.model, cfg.train
    world = nodes * gpus_per_node
    student = cfg.student_world_size(world)
    candidates = []
    for tp, pp in itertools.product(_divisors(gpus_per_node), _divisors(m.num_layers)):
        if student % (tp * pp) or not _teacher_tp_ok(m, tp):
            continue
        dp = student // (tp * pp)
        vpp = cfg.parallel.vpp if pp > 1 and cfg.parallel.vpp and m.num_layers % (pp * cfg.parallel.vpp) == 0 else None
        for micro in [mb for mb in _divisors(t.micro_batch)][::-1]:
            if t.global_batch % (micro * dp):
                continue
            if vpp and (t.global_batch // (micro * dp)) % pp:
                continue
            for distopt, level in itertools.product((True, False), RECOMPUTE_LEVELS):
                lay = Layout(tp, pp, vpp, tp > 1, distopt, level, micro)
                key = (RECOMPUTE_LEVELS.index(level), tp * pp, pp, -micro, not distopt)
                candidates.append((key, lay))
    teacher_fix = _teacher_overrides(cfg, gpu_mem_gib)
    for _, lay in sorted(candidates, key=lambda c: c[0]):
        overrides = lay.overrides() + teacher_fix
        try:
            trial = with_overrides(cfg, overrides)
            plan = make_plan(trial, nodes, gpus_per_node, gpu_mem_gib)
        except ConfigError:
            continue
        if plan.fits:
            return overrides, plan
    return None


def _teacher_overrides(cfg: Config, gpu_mem_gib: float) -> list[str]:
    """Raise an online teacher's tp (keeping its ranks) until its GPUs fit."""
    out = []
    b = cfg.train.micro_batch * (2 if cfg.stage == "fpo" else 1)
    for i, (tc, tm) in enumerate(zip(cfg.fuse.teachers, teacher_models(cfg))):
        if tc.source != "online":
            continue
        for tp in _divisors(tc.ranks):
            if tp < tc.tp or not _teacher_tp_ok(tm, tp):
                continue
            probe = TeacherPlan(tc.name, tm, tc.source, tc.ranks, tp, param_count(tm))
            _fill_teacher_memory(probe, tm, tp, b)
            if probe.total <= gpu_mem_gib * GIB * USABLE_FRACTION:
                if tp != tc.tp:
                    out.append(f"fuse.teachers.{i}.tp={tp}")
                break
    return out


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    from megatron_fusion.config import apply_overrides, config_from_dict

    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


# --- printing --------------------------------------------------------------------------------

def _g(x: float) -> str:
    return f"{x / GIB:6.2f}"


def _b(n: int) -> str:
    return f"{n / 1e9:.2f} B"


def render(plan: Plan, config_path: str) -> str:
    cfg, lay = plan.cfg, plan.layout
    t, m = cfg.train, cfg.model
    lines = [f"plan: {config_path}  stage={cfg.stage}  {plan.nodes} node(s) x {plan.gpus_per_node} GPUs"
             f" = {plan.world} ranks, {plan.gpu_mem / GIB:.0f} GiB per GPU "
             f"(usable {plan.budget / GIB:.1f} GiB = {USABLE_FRACTION:.0%})"]
    teacher_ranks = plan.world - plan.student_ranks
    lines.append(f"layout: student ranks 0-{plan.student_ranks - 1} ({plan.student_ranks / plan.gpus_per_node:g} nodes):"
                 f" tp={lay.tp} pp={lay.pp} vpp={lay.vpp or '-'} dp={plan.dp}"
                 f" sequence_parallel={'on' if lay.sp else 'off'}"
                 f" distributed_optimizer={'on' if lay.distributed_optimizer else 'off'}"
                 f" recompute={lay.recompute or 'none'} fp8={t.fp8 or 'off'}"
                 f"{'/' + t.fp8_recipe if t.fp8 else ''} precision={t.precision}")
    start = plan.student_ranks
    for tp in plan.teachers:
        if tp.source == "online":
            lines.append(f"        teacher {tp.name}: ranks {start}-{start + tp.ranks - 1}, tp={tp.tp}, "
                         f"{tp.ranks // tp.tp} replica(s)")
            start += tp.ranks
        else:
            lines.append(f"        teacher {tp.name}: offline top-K (no GPUs)")
    if teacher_ranks:
        lines.append(f"        online teachers: {teacher_ranks} ranks = {teacher_ranks / plan.gpus_per_node:g} nodes")
    lines.append("parameters (true vocabulary; Megatron pads the vocabulary to a multiple of "
                 f"{m.make_vocab_size_divisible_by}*tp):")
    pc = param_count(m)
    lines.append(f"  {'pivot':<40} {_b(pc.total):>9}  ({m.num_layers} layers x {pc.per_layer / 1e6:.1f} M, "
                 f"embedding {pc.embedding / 1e6:.0f} M, output {pc.output / 1e6:.0f} M; "
                 f"padded at tp={lay.tp}: {_b(param_count(m, m.padded_vocab_size(lay.tp)).total)})")
    for tp in plan.teachers:
        p = tp.params
        lines.append(f"  teacher {tp.name:<32} {_b(p.total):>9}  ({tp.model.num_layers} layers x "
                     f"{p.per_layer / 1e6:.1f} M, embedding {p.embedding / 1e6:.0f} M, output {p.output / 1e6:.0f} M)")
    for sm in plan.student:
        lines += _render_student(plan, sm)
    for tp in plan.teachers:
        if tp.source != "online":
            continue
        verdict = "fits" if tp.total <= plan.budget else "DOES NOT FIT"
        lines.append(f"teacher {tp.name} per GPU (tp={tp.tp}, GiB): weights {_g(tp.weights).strip()}"
                     f" + forward activations {_g(tp.activations).strip()} + K/V {_g(tp.kv).strip()}"
                     f" + logits {_g(tp.logits).strip()} + reserve {_g(tp.reserve).strip()}"
                     f" = {_g(tp.total).strip()}  {verdict}")
    seqs = 2 if cfg.stage == "fpo" else 1
    tokens = t.global_batch * seqs * m.seq_length
    n_micro = t.global_batch // (lay.micro_batch * plan.dp)
    lines.append(f"tokens per step: {tokens:,} ({t.global_batch} samples x {seqs} sequence(s) x "
                 f"{m.seq_length}); {n_micro} micro-batches of {lay.micro_batch} per DP rank")
    lines += _render_balance(plan, tokens)
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _render_student(plan: Plan, sm: StudentMemory) -> list[str]:
    lay = plan.layout
    acts = sm.activations
    total = sm.total(lay.recompute)
    verdict = "fits" if total <= plan.budget else "DOES NOT FIT"
    label = {"only": "", "first": " first pipeline stage", "last": " last pipeline stage"}[sm.stage]
    chosen = lay.recompute or "none"
    def row(label: str, value: float, extra: str = "") -> str:
        return f"  {label:<36}{_g(value)}{'   ' + extra if extra else ''}"

    fp8 = " + fp8 copies" if plan.cfg.train.fp8 else ""
    return [
        f"student memory per GPU{label} ({sm.params / 1e9:.2f} B params, GiB):",
        row(f"weights ({plan.cfg.train.precision}{fp8})", sm.weights),
        row("grads (fp32 main grads)", sm.grads),
        row("optimizer (fp32 params + Adam m, v)", sm.optimizer,
            f"[distributed over dp={plan.dp}: {_g(sm.optimizer_distopt).strip()} | "
            f"not distributed: {_g(sm.optimizer_no_distopt).strip()}]"),
        row(f"activations (recompute={chosen})", acts[lay.recompute],
            f"[none {_g(acts[None]).strip()} | selective {_g(acts['selective']).strip()} | "
            f"full {_g(acts['full']).strip()}]"),
        row("logits shard", sm.logits),
        row("teacher top-K buffers", sm.topk),
        row("runtime reserve", sm.reserve),
        row("total", total, f"of {plan.budget / GIB:.1f} usable: {verdict}"),
    ]


@dataclass
class TeacherBalance:
    """One online teacher's compute per optimizer step against the student's (equal FLOP/s per
    GPU, perfect TP scaling). A replica (``tp`` ranks) serves the student DP ranks ``d`` with
    ``d % replicas == replica`` (``megatron_fusion.online``), so the busiest one serves
    ``ceil(dp / replicas)`` of them and replicas beyond dp idle."""

    name: str
    tp: int
    replicas: int
    ratio: float                 # busiest replica's forward time / student step time
    replicas_needed: Optional[int]   # fewest replicas with ratio <= 1 at this tp; None: none do
    larger_tp: Optional[tuple[int, int]]  # then: (smallest tp that can hide it, fewest replicas)

    @property
    def hidden(self) -> bool:
        return self.ratio <= 1.0


def teacher_balance(plan: Plan) -> list[TeacherBalance]:
    """Per online teacher: is it hidden behind the student (ratio <= 1), and how many replicas
    would hide it. ``fuse.prefetch`` does not enter: a teacher computes at most that many
    micro-batches ahead, a buffer that absorbs jitter and the first micro-batch's wait, so a
    teacher slower than the student on average still makes it wait every step (ratio > 1)."""
    cfg = plan.cfg
    s = cfg.model.seq_length
    seqs = 2 if cfg.stage == "fpo" else 1
    tokens = cfg.train.global_batch * seqs * s
    recompute = 4 / 3 if plan.layout.recompute == "full" else 1
    student_time = 3 * forward_flops_per_token(cfg.model, s) * recompute * tokens / plan.student_ranks
    per_dp = tokens / plan.dp                   # tokens one student DP rank consumes per step
    out = []
    for tp in plan.teachers:
        if tp.source != "online":
            continue
        work = forward_flops_per_token(tp.model, s) * per_dp     # one DP rank's share, one GPU

        def ratio(replicas: int, t: int) -> float:
            return -(-plan.dp // replicas) * work / t / student_time

        def fewest(t: int) -> Optional[int]:
            return next((r for r in range(1, plan.dp + 1) if ratio(r, t) <= 1.0), None)

        replicas = max(tp.ranks // tp.tp, 1)
        needed = fewest(tp.tp)
        larger = None
        if needed is None:
            larger = next(((t, fewest(t)) for t in _divisors(plan.gpus_per_node)
                           if t > tp.tp and _teacher_tp_ok(tp.model, t) and fewest(t)), None)
        out.append(TeacherBalance(tp.name, tp.tp, replicas, ratio(replicas, tp.tp), needed, larger))
    return out


def _render_balance(plan: Plan, tokens: int) -> list[str]:
    """Online teachers vs the student, assuming equal FLOP/s per GPU: > 1 means the student waits."""
    balance = teacher_balance(plan)
    if not balance:
        return []
    out = ["teacher/student compute time per step (equal FLOP/s per GPU; > 1: student waits): "
           + ", ".join(f"{b.name} {b.ratio:.2f}" for b in balance)]
    for b in balance:
        if b.replicas_needed is not None:
            need = (f"needs >= {b.replicas_needed} replica(s) = {b.replicas_needed * b.tp} ranks "
                    f"at tp={b.tp} to hide behind the student")
        elif b.larger_tp is not None:
            t, r = b.larger_tp
            need = (f"no replica count hides it at tp={b.tp} (a replica serves whole DP ranks, "
                    f"dp={plan.dp}); at tp={t}: >= {r} replica(s) = {r * t} ranks")
        else:
            need = f"cannot be hidden behind {plan.student_ranks} student ranks at any tp"
        idle = (f"; {b.replicas - plan.dp} replica(s) idle (more than dp={plan.dp})"
                if b.replicas > plan.dp else "")
        out.append(f"  {b.name}: {b.replicas} replica(s) x tp={b.tp}, ratio {b.ratio:.2f} "
                   f"({'hidden' if b.hidden else 'student waits'}); {need}{idle}")
    slow = [b.name for b in balance if not b.hidden]
    prefetch = plan.cfg.fuse.prefetch
    out.append("balance: " + (f"balanced (every online teacher hidden; prefetch={prefetch} "
                              "micro-batches absorb jitter)" if not slow else
                              f"NOT balanced: the student waits for {', '.join(slow)} every step "
                              f"(prefetch={prefetch} only absorbs jitter)"))
    return out


def teacher_rank_overrides(cfg: Config, teacher_nodes: int, nodes: int, gpus_per_node: int) -> list[str]:
    """``fuse.teachers.<i>.ranks=<n>`` overrides giving the online teachers ``teacher_nodes`` nodes."""
    if not 0 <= teacher_nodes < nodes:
        raise ConfigError("--teacher-nodes", f"{teacher_nodes} must be in [0, nodes={nodes})")
    ranks = split_teacher_ranks(cfg, teacher_nodes * gpus_per_node)
    return [f"fuse.teachers.{i}.ranks={r}" for i, (r, tc) in enumerate(zip(ranks, cfg.fuse.teachers))
            if tc.source == "online"]

