"""The student (and Megatron-backend teacher) model: a Llama-style megatron-core GPTModel.

``build_transformer_config(cfg)`` maps the typed config onto megatron-core's TransformerConfig;
``build_model(cfg)`` returns the list of model chunks this rank owns (one per virtual pipeline
stage), unwrapped; the trainer wraps them in Megatron DDP.

Layer spec: Transformer Engine's when TE imports on a GPU (needed for FP8), otherwise the local
(pure megatron-core) spec. Fused kernels only where their backing import exists: the local
spec's fused masked softmax needs the compiled ``scaled_*_softmax_cuda`` extensions (Apex /
megatron's fused kernels), else attention takes the plain softmax; one line per process says
which (``kernel_report``). The local spec has ``ShardedNorm`` in place of the stock torch-norm
wrapper, whose parameters carry ``sequence_parallel`` so ``finalize_model_grads`` all-reduces
their gradients over TP when sequence parallelism is on (the stock wrapper refuses SP), and
``QKNorm`` for the per-head q/k norms (``model.qk_layernorm``, Qwen3). Llama-3.x RoPE scaling
(``model.rope_scaling``) is applied to each built chunk's RoPE frequencies (``apply_rope_scaling``).
"""

from __future__ import annotations

import importlib.util
import weakref

import torch
import torch.nn.functional as F

from megatron_fusion.config import Config, ModelConfig


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    impl = model_cfg.transformer_impl
    if impl == "local":
        return False
    have = te_available()
    if impl == "transformer_engine" and not have:
        raise RuntimeError("model.transformer_impl: 'transformer_engine' requested but Transformer "
                           "Engine does not import (or there is no GPU)")
    return have


# Compiled kernels behind megatron's FusedScaleMaskSoftmax (fusions/fused_softmax.py imports
# them at the first forward, so without them masked_softmax_fusion=True fails there).
FUSED_SOFTMAX_MODULES = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
                         "scaled_softmax_cuda")


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def fused_softmax_available() -> bool:
    """True on a GPU where all of megatron's compiled fused-softmax kernels import."""
    return torch.cuda.is_available() and all(_module_exists(m) for m in FUSED_SOFTMAX_MODULES)


def kernel_report(te: bool) -> str:
    """The one line saying which layers and attention softmax this process runs."""
    if te:
        return "kernels: Transformer Engine layers (fused norm+linear, TE attention)"
    why = "on CPU" if not torch.cuda.is_available() else (
        "Transformer Engine does not import" if not te_available() else "model.transformer_impl=local")
    softmax = ("Apex fused masked softmax" if fused_softmax_available()
               else "plain softmax (no compiled scaled_*_softmax_cuda kernels)")
    return f"kernels: local layer spec ({why}), {softmax}"


_reported: set[str] = set()


def _report_kernels_once(te: bool) -> None:
    """Print ``kernel_report`` once per process (rank 0), on stderr: stdout may carry data."""
    import sys

    import torch.distributed as dist

    line = kernel_report(te)
    if line in _reported:
        return
    _reported.add(line)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, file=sys.stderr, flush=True)


def check_fp8(cfg: Config) -> None:
    """``train.fp8`` runs the transformer layers' GEMMs in FP8 through Transformer Engine; without
    TE (or a GPU) it would silently train in the base precision, so it is refused instead."""
    from megatron_fusion.config import ConfigError

    if cfg.train.fp8 is None:
        return
    if cfg.model.transformer_impl == "local" or not te_available():
        raise ConfigError("train.fp8", f"{cfg.train.fp8!r} needs the Transformer Engine layers on "
                          "a GPU (TE does not import here, or model.transformer_impl is 'local'); "
                          "unset train.fp8")
    if cfg.train.precision != "bf16":
        raise ConfigError("train.fp8", f"FP8 runs on top of bf16 (train.precision is "
                          f"{cfg.train.precision!r}); set train.precision=bf16")


class ShardedNorm(torch.nn.Module):
    """RMSNorm/LayerNorm over the hidden dim whose params are tagged for sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        self.norm = cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.norm.parameters():
            # Read by finalize_model_grads: grads of SP-replicated params are all-reduced over TP.
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x):
        return self.norm(x)


class QKNorm(torch.nn.RMSNorm):
    """The per-head query / key RMSNorm (``qk_layernorm``, Qwen3's q_norm / k_norm) of the local
    spec: a plain ``torch.nn.RMSNorm`` over head_dim, so its state-dict key is ``weight`` as in the
    TE spec's TENorm. Megatron's stock wrapper refuses sequence parallelism, which does not touch
    these norms (they see TP-sharded heads, not sequence-sharded hidden states); their gradients
    are summed over TP by ``finalize_model_grads`` (it matches q_layernorm / k_layernorm by name)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


def apply_rope_scaling(model, m: ModelConfig) -> None:
    """Llama-3.x frequency scaling (``model.rope_scaling: llama3``) on a built GPTModel's RoPE.

    megatron-core's ``RotaryEmbedding._apply_scaling`` is HF's ``_compute_llama3_parameters``
    formula, but GPTModel passes it only the factor (low/high factors and the original context
    fixed at 1, 4, 8192); this calls it with all four, once, on the unscaled inverse frequencies.
    Every pipeline stage holds its own RotaryEmbedding: each is scaled."""
    rope = getattr(model, "rotary_pos_emb", None)
    if m.rope_scaling is None or rope is None:
        return
    if m.rope_scaling != "llama3":
        raise ValueError(f"model.rope_scaling: {m.rope_scaling!r} is not implemented")
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq, factor=m.rope_scaling_factor, low_freq_factor=m.rope_low_freq_factor,
        high_freq_factor=m.rope_high_freq_factor,
        original_max_position_embeddings=m.rope_original_max_position_embeddings)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_transformer_config(cfg: Config, *, num_layers: int | None = None,
                             model_cfg: ModelConfig | None = None, tp: int | None = None,
                             pp: int | None = None):
    """megatron-core TransformerConfig for ``cfg`` (or a teacher's ``model_cfg``)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = model_cfg or cfg.model
    p = cfg.parallel
    on_gpu = torch.cuda.is_available()
    dtype = _dtype(cfg.train.precision)
    kw = dict(
        num_layers=num_layers or m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_size,
        kv_channels=getattr(m, "kv_channels", None),
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=tp if tp is not None else p.tp,
        pipeline_model_parallel_size=pp if pp is not None else p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if model_cfg is None else None,
        sequence_parallel=p.sequence_parallel if model_cfg is None else False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fusions need compiled kernels: on only where their import exists (TE's attention
        # does its own softmax and ignores this).
        bias_activation_fusion=False,
        # (off with packing: the fused causal kernel ignores the block-diagonal mask, §10)
        masked_softmax_fusion=fused_softmax_available() and cfg.data.packing == "none",
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # The stage loss returns (sum, count); Megatron normalises once by the global count.
        calculate_per_token_loss=True,
        # batch_p2p_sync=True calls torch.cuda.synchronize between p2p ops.
        batch_p2p_sync=on_gpu,
        deallocate_pipeline_outputs=on_gpu,
    )
    if cfg.train.recompute is not None:
        kw["recompute_granularity"] = cfg.train.recompute
        if cfg.train.recompute == "full":
            kw.update(recompute_method="uniform", recompute_num_layers=1)
    if cfg.train.fp8 is not None:
        kw.update(fp8=cfg.train.fp8, fp8_recipe=cfg.train.fp8_recipe)
    return TransformerConfig(**kw)


def layer_spec(cfg: Config, tcfg, *, te: bool, vp_stage: int | None = None,
               pp_rank: int | None = None):
    """Block spec: TE layers, or local layers with ShardedNorm (also as the final norm)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=tcfg.qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization=tcfg.normalization, qk_layernorm=tcfg.qk_layernorm)
    norm = ModuleSpec(module=ShardedNorm)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    if tcfg.qk_layernorm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = QKNorm
    n_local = get_num_layers_to_build(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * n_local, layer_norm=ShardedNorm)


def build_model(cfg: Config, *, model_cfg: ModelConfig | None = None, vocab_size: int | None = None,
                tp: int | None = None, pp: int | None = None, pp_rank: int | None = None,
                pp_size: int | None = None) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual stage), on the current device, unwrapped."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    m = model_cfg or cfg.model
    tcfg = build_transformer_config(cfg, model_cfg=model_cfg, tp=tp, pp=pp)
    te = use_transformer_engine(m)
    _report_kernels_once(te)
    vocab = vocab_size or m.padded_vocab_size(tcfg.tensor_model_parallel_size)
    vpp = tcfg.virtual_pipeline_model_parallel_size or 1
    pp_rank = ps.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
    pp_size = ps.get_pipeline_model_parallel_world_size() if pp_size is None else pp_size
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        first = pp_rank == 0 and vp == 0
        last = pp_rank == pp_size - 1 and vp == vpp - 1
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=layer_spec(cfg, tcfg, te=te, vp_stage=vp_stage, pp_rank=pp_rank),
            vocab_size=vocab,
            max_sequence_length=m.max_position_embeddings or m.seq_length,
            pre_process=first,
            post_process=last,
            parallel_output=True,  # logits stay vocab-sharded: the losses work on the local shard
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(m.rotary_base),
            vp_stage=vp_stage,
        )
        apply_rope_scaling(model, m)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def count_parameters(chunks) -> int:
    return sum(p.numel() for c in chunks for p in c.parameters())


# --- the forward of one micro-batch: unpacked rows, or packed ones (docs/methods.md §10) -------

_te_models: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def uses_te_attention(model: torch.nn.Module) -> bool:
    """True when the model's layers are Transformer Engine's (``layer_spec(te=True)``)."""
    if model not in _te_models:
        _te_models[model] = any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine")
                                for m in model.modules())
    return _te_models[model]


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``segment_ids [b, s]`` -> megatron's attention mask ``[b, 1, s, s]``, True = masked: a
    query sees the keys of its own segment at or before it (padding, id -1, is a segment too)."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]             # [b, s, s]
    return ~(same & causal)[:, None]


def packed_seq_params(batch: dict):
    """Megatron's ``PackedSeqParams`` (THD) of a packed micro-batch: its rows flattened into one
    sequence of ``b * s`` tokens, every segment and padding tail its own sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(device=batch["tokens"].device, dtype=torch.int32)
    mx = int(batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=mx, max_seqlen_kv=mx)


def model_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The student's forward on one micro-batch -> logits ``[b, s, v/tp]`` (last stage) or hidden
    states (other stages). The ONE place that decides how a packed batch is attended:

    - unpacked: megatron's own causal mask (``attention_mask=None``);
    - packed, Transformer Engine layers: THD, ``PackedSeqParams`` with ``cu_seqlens`` (the rows
      flattened into one sequence; TE attends within each sequence, RoPE restarts per sequence);
    - packed, local spec (CPU, GPU without TE): a block-diagonal causal mask ``[b, 1, s, s]``.
      RoPE then runs over the row's slot positions, but a rotary score depends only on the
      query-key offset, which inside a segment is the offset from the sample's position 0.
    """
    tokens, pos = batch["tokens"], batch["position_ids"]
    if "segment_ids" not in batch:
        return model(tokens, pos, None)   # causal mask built inside
    inner = getattr(model, "module", model)           # under Megatron DDP: the GPTModel
    if uses_te_attention(inner):
        b, s = tokens.shape
        if b > 1 and not inner.post_process:
            raise ValueError("data.packing with Transformer Engine under pipeline parallelism "
                             "needs train.micro_batch=1 (the THD sequence flattens the rows)")
        out = model(tokens.reshape(1, b * s), pos.reshape(1, b * s), None,
                    packed_seq_params=packed_seq_params(batch))
        return out.reshape(b, s, -1) if out.dim() == 3 and out.shape[0] == 1 else out
    if inner.config.masked_softmax_fusion:
        # the fused causal softmax kernel ignores a given mask: samples would see each other
        raise ValueError("data.packing with the local layer spec needs masked_softmax_fusion "
                         "off (build_transformer_config turns it off when data.packing is set)")
    return model(tokens, pos, block_causal_mask(batch["segment_ids"]))
