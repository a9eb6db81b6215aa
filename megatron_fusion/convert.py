"""Hugging Face <-> Megatron checkpoint conversion (Llama incl. Llama-3.x RoPE scaling, Mistral,
Qwen2 / Qwen2.5, Qwen3 dense, Phi-3 families; docs/models.md has the table).

    python tools/convert_hf_to_megatron.py --hf HF_DIR --out MEG_DIR [--tp 2 --pp 2] [--spec te]
    python tools/convert_megatron_to_hf.py --megatron MEG_DIR --out HF_DIR
    python tools/check_conversion.py --hf HF_DIR --megatron MEG_DIR [--tp 2 --pp 2]

HF -> Megatron builds the model once at TP1/PP1 in this process, fills its state dict from the
safetensors shards one tensor at a time (a fused Megatron tensor waits only for its own pieces:
q/k/v -> linear_qkv, gate/up -> linear_fc1) and saves it with ``dist_checkpointing``, which
reshards to the training TP/PP at load. RAM: the Megatron model plus at most a layer's pieces.
The output is a run-style dir the trainer starts from (``checkpoint.load=MEG_DIR``):

    MEG_DIR/config.yaml                  model section from the HF config (trainer schema)
    MEG_DIR/hf_config.json               the HF config.json, for the way back
    MEG_DIR/tokenizer.json ...           tokenizer files copied from HF_DIR
    MEG_DIR/checkpoints/iter_0000000/    dist checkpoint (model only) + meta.json
    MEG_DIR/checkpoints/latest

The padded vocab (Megatron pads the embedding to make_vocab_size_divisible_by * tp rows) is
taken at the target ``--tp`` and recorded in meta.json's layout: the trainer must run at a TP
with the same padded size (the same TP, or any TP for which it does not change).

Layer spec (``--spec``): the checkpoint keys are written in the Transformer Engine spec's names
(``te``) or the local spec's (``local``); default: what the trainer builds on this machine (te
when TE imports on a GPU). Either loads into a model of either spec (checkpoint.py maps the
names, meta.json records ``layer_spec``). The conversion itself always fills a local-spec model
(its names are the plan's targets), so ``--spec te`` works on a machine without TE.

Megatron -> HF loads the weights at TP1/PP1 (any saved layout, either spec), maps them back and writes
safetensors shards as it goes (never a second full copy), config.json and the tokenizer.

Layouts (checked by the logits tests): Megatron's linear_qkv rows are, per query group,
[q heads of the group..., k, v]; linear_fc1 is [gate; up]; RoPE is non-interleaved
(rotate_half on [first half, second half]) in both, so q/k need no permutation. Qwen3's
q_norm / k_norm (RMSNorm over head_dim, before RoPE) are Megatron's q_layernorm / k_layernorm;
Llama-3.x's ``rope_type: llama3`` maps onto ``model.rope_scaling: llama3`` and its four numbers.
An embedding padded past the tokenizer (Qwen2.5: 152,064 rows for 151,665 tokens) converts with
all its rows (``model.vocab_size`` = the HF rows) and is written back with them; the trainer
takes softmaxes, z-scores and top-K over the tokenizer's ids only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from megatron_fusion.config import Config, ModelConfig, save_config
from megatron_fusion.errors import UserError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
    "Qwen3ForCausalLM": "qwen3",
}
UNSUPPORTED_ARCHITECTURES = {   # known families the Megatron model cannot express: why, what to do
    arch: ("Gemma's decoder differs from the Megatron GPT model (RMSNorm with (1 + weight), GeGLU "
           "MLP, embeddings scaled by sqrt(hidden), extra post-attention / post-MLP norms" +
           extra + "); use it as a teacher with backend: hf (offline or online)")
    for arch, extra in (("GemmaForCausalLM", ""),
                        ("Gemma2ForCausalLM", ", logit soft-capping, sliding-window layers"),
                        ("Gemma3ForCausalLM", ", q/k norms, sliding-window layers"),
                        ("Gemma3ForConditionalGeneration", ", q/k norms, sliding-window layers, a "
                                                           "vision tower"))}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message names the tensor or config field."""


# --- HF config -> ModelConfig ---------------------------------------------------------------

def _rope(hf: dict) -> tuple[float, dict]:
    """(theta, the remaining rope parameters) from a transformers 4.x or 5.x config dict."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    return float(theta), params


def model_config_from_hf(hf: dict) -> tuple[str, ModelConfig]:
    """(architecture, ModelConfig) for an HF config.json dict; ConversionError if unsupported."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in UNSUPPORTED_ARCHITECTURES:
        raise ConversionError(f"config.json: architectures={archs} is not supported by the Megatron "
                              f"model: {UNSUPPORTED_ARCHITECTURES[arch]}")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"config.json: architectures={archs} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    family = SUPPORTED_ARCHITECTURES[arch]
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act={hf['hidden_act']!r}: only SwiGLU (silu) MLPs "
                              "convert")
    if hf.get("mlp_bias"):
        raise ConversionError("config.json: mlp_bias=true is not supported (Megatron model has no "
                              "MLP bias)")
    if family in ("llama", "mistral", "qwen3") and hf.get("attention_bias"):
        raise ConversionError("config.json: attention_bias=true (biases on q/k/v and o_proj) is not "
                              "supported: the model has a QKV bias only (Qwen2)")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ConversionError("config.json: use_sliding_window=true is not supported (full attention)")
    theta, rope = _rope(hf)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    partial = float(rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise ConversionError(f"config.json: partial_rotary_factor={partial} (partial RoPE) is not "
                              "supported")
    scaling = {}
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_ROPE_FIELDS if k not in rope]
        if missing:
            raise ConversionError(f"config.json: rope scaling 'llama3' without {missing[0]}")
        scaling = dict(rope_scaling="llama3", **{f: float(rope[k]) for k, f in LLAMA3_ROPE_FIELDS.items()})
        scaling["rope_original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    elif rope_type not in (None, "default"):
        raise ConversionError(f"config.json: rope scaling {rope_type!r} is not supported (plain RoPE "
                              "or llama3)")
    if theta != int(theta):
        raise ConversionError(f"config.json: rope_theta={theta} is not an integer (Megatron's "
                              "rotary_base is)")
    if family == "mistral" and hf.get("sliding_window"):
        warnings.warn(f"config.json: sliding_window={hf['sliding_window']} is ignored: the Megatron "
                      "model attends fully (identical up to that many tokens)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    m = ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        ffn_hidden_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        seq_length=min(max_pos, 4096),
        max_position_embeddings=max_pos,
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        swiglu=True,
        rotary_base=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        **scaling,
    )
    return arch, m


LLAMA3_ROPE_FIELDS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                      "high_freq_factor": "rope_high_freq_factor",
                      "original_max_position_embeddings": "rope_original_max_position_embeddings"}
"""HF ``rope_parameters`` (``rope_scaling`` in transformers 4.x) keys of rope_type llama3 ->
ModelConfig fields."""


def rope_parameters_for(m: ModelConfig) -> dict:
    """The HF rope parameters of ``m``: transformers 5's ``rope_parameters`` dict (theta included)."""
    out = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_scaling == "llama3":
        out["rope_type"] = "llama3"
        for k, f in LLAMA3_ROPE_FIELDS.items():
            out[k] = getattr(m, f)
    return out


# --- tensor packing -------------------------------------------------------------------------

def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
             head_dim: int) -> torch.Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> Megatron [(heads + 2*groups)*d, ...], rows per
    group = [q heads of the group..., k, v]."""
    rest = q.shape[1:]
    qg = q.reshape(groups, heads // groups * head_dim, *rest)
    kg = k.reshape(groups, head_dim, *rest)
    vg = v.reshape(groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def unpack_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> list[torch.Tensor]:
    """Inverse of ``pack_qkv``: [q, k, v]."""
    rest = qkv.shape[1:]
    per = heads // groups * head_dim
    g = qkv.reshape(groups, per + 2 * head_dim, *rest)
    q, k, v = torch.split(g, [per, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


@dataclass
class Entry:
    """One Megatron tensor and the HF tensors it is made of."""

    target: str                             # Megatron state-dict key
    sources: list[tuple[str, tuple]]        # (HF name, expected HF shape)
    to_megatron: Callable[[list], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list]


def _cat(parts):
    return torch.cat(parts, dim=0)


def conversion_plan(arch: str, m: ModelConfig, padded_vocab: int) -> list[Entry]:
    """Every Megatron tensor of the model with its HF sources, in checkpoint order."""
    family = SUPPORTED_ARCHITECTURES[arch]
    H, nh, ng, d, F = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_size
    V = m.vocab_size
    ident = (lambda ts: ts[0], lambda t: [t])

    def pad_rows(ts):                                      # [V, H] -> [padded, H], zero rows
        out = ts[0].new_zeros(padded_vocab, ts[0].shape[1])
        out[:V] = ts[0]
        return out

    vocab = (pad_rows, lambda t: [t[:V].contiguous()])
    qkv = (lambda ts: pack_qkv(*ts, nh, ng, d), lambda t: unpack_qkv(t, nh, ng, d))
    fused_qkv = (lambda ts: pack_qkv(*torch.split(ts[0], [nh * d, ng * d, ng * d]), nh, ng, d),
                 lambda t: [torch.cat(unpack_qkv(t, nh, ng, d))])
    gate_up = (_cat, lambda t: [x.contiguous() for x in torch.split(t, [F, F])])

    plan = [Entry("embedding.word_embeddings.weight", [("model.embed_tokens.weight", (V, H))], *vocab)]
    for i in range(m.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        plan.append(Entry(mg + "input_layernorm.norm.weight", [(hf + "input_layernorm.weight", (H,))],
                          *ident))
        if family == "phi3":
            plan.append(Entry(mg + "self_attention.linear_qkv.weight",
                              [(hf + "self_attn.qkv_proj.weight", ((nh + 2 * ng) * d, H))], *fused_qkv))
        else:
            plan.append(Entry(mg + "self_attention.linear_qkv.weight",
                              [(hf + "self_attn.q_proj.weight", (nh * d, H)),
                               (hf + "self_attn.k_proj.weight", (ng * d, H)),
                               (hf + "self_attn.v_proj.weight", (ng * d, H))], *qkv))
        if m.add_qkv_bias:
            plan.append(Entry(mg + "self_attention.linear_qkv.bias",
                              [(hf + "self_attn.q_proj.bias", (nh * d,)),
                               (hf + "self_attn.k_proj.bias", (ng * d,)),
                               (hf + "self_attn.v_proj.bias", (ng * d,))], *qkv))
        if m.qk_layernorm:
            plan.append(Entry(mg + "self_attention.q_layernorm.weight",
                              [(hf + "self_attn.q_norm.weight", (d,))], *ident))
            plan.append(Entry(mg + "self_attention.k_layernorm.weight",
                              [(hf + "self_attn.k_norm.weight", (d,))], *ident))
        plan.append(Entry(mg + "self_attention.linear_proj.weight",
                          [(hf + "self_attn.o_proj.weight", (H, nh * d))], *ident))
        plan.append(Entry(mg + "pre_mlp_layernorm.norm.weight",
                          [(hf + "post_attention_layernorm.weight", (H,))], *ident))
        if family == "phi3":
            plan.append(Entry(mg + "mlp.linear_fc1.weight", [(hf + "mlp.gate_up_proj.weight", (2 * F, H))],
                              *ident))
        else:
            plan.append(Entry(mg + "mlp.linear_fc1.weight", [(hf + "mlp.gate_proj.weight", (F, H)),
                                                             (hf + "mlp.up_proj.weight", (F, H))], *gate_up))
        plan.append(Entry(mg + "mlp.linear_fc2.weight", [(hf + "mlp.down_proj.weight", (H, F))], *ident))
    plan.append(Entry("decoder.final_layernorm.norm.weight", [("model.norm.weight", (H,))], *ident))
    if not m.tie_embeddings:
        plan.append(Entry("output_layer.weight", [("lm_head.weight", (V, H))], *vocab))
    return plan


# --- HF side: config, shards ----------------------------------------------------------------

def read_hf_config(hf_dir: str | Path) -> dict:
    p = Path(hf_dir) / "config.json"
    if not p.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    return json.loads(p.read_text())


def safetensors_files(hf_dir: str | Path) -> list[Path]:
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    raise ConversionError(f"{d}: no model.safetensors(.index.json); re-save the model with "
                          "save_pretrained(safe_serialization=True)")


def _hf_shapes(files: list[Path]) -> dict[str, tuple]:
    """Name -> shape from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def check_hf_tensors(plan: list[Entry], shapes: dict[str, tuple], tied: bool) -> None:
    """Every source present with its expected shape, no tensor left over."""
    needed = {}
    for e in plan:
        for name, shape in e.sources:
            needed[name] = shape
    for name, shape in needed.items():
        if name not in shapes:
            raise ConversionError(f"tensor {name}: missing from the checkpoint")
        if tuple(shapes[name]) != tuple(shape):
            raise ConversionError(f"tensor {name}: shape {list(shapes[name])} does not match the "
                                  f"config's {list(shape)}")
    for name in shapes:
        if name in needed or name.endswith(_IGNORED_HF_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        raise ConversionError(f"tensor {name}: not part of a supported model (unexpected in the "
                              "checkpoint)")


def _stream_hf(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# --- Megatron side --------------------------------------------------------------------------

def _build_single(cfg: Config, padded: int):
    """The whole model at TP1/PP1 in this process (Megatron state re-initialised to that), in
    the local layer spec: its state-dict names are the conversion plan's targets."""
    from megatron_fusion.model import build_model
    from megatron_fusion.parallel import init_distributed, init_student_groups

    init_distributed()
    init_student_groups(1, 1)
    cfg.parallel = dataclasses.replace(cfg.parallel, tp=1, pp=1, vpp=None, sequence_parallel=False)
    cfg.model = dataclasses.replace(cfg.model, transformer_impl="local")
    with torch.random.fork_rng():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        return build_model(cfg, vocab_size=padded, pp_rank=0, pp_size=1)[0]


def default_layer_spec() -> str:
    """The spec the trainer builds here by default: te when Transformer Engine imports on a GPU."""
    from megatron_fusion.model import te_available

    return "te" if te_available() else "local"


def validate_layout(m: ModelConfig, tp: int, pp: int) -> None:
    groups = m.num_query_groups or m.num_attention_heads
    for what, n in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", groups),
                    ("ffn_hidden_size", m.ffn_size)):
        if n % tp:
            raise ConversionError(f"--tp {tp} does not divide {what}={n}")
    if tp < 1 or pp < 1 or m.num_layers % pp:
        raise ConversionError(f"--pp {pp} does not divide num_layers={m.num_layers}")


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
                   spec: str | None = None) -> Path:
    """Convert an HF model dir into a run-style Megatron dir; returns the checkpoint path.
    ``spec``: the layer spec whose names the checkpoint is written in (default: this machine's).

    Collective when torch.distributed runs with several ranks (tests): every rank fills the
    same TP1 model, dist_checkpointing writes each tensor once, rank 0 writes the files.
    """
    import torch.distributed as dist

    from megatron_fusion.checkpoint import LAYER_SPECS, rename_sharded_keys

    spec = spec or default_layer_spec()
    if spec not in LAYER_SPECS:
        raise ConversionError(f"--spec {spec!r}: not one of {', '.join(LAYER_SPECS)}")
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf = read_hf_config(hf_dir)
    arch, m = model_config_from_hf(hf)
    validate_layout(m, tp, pp)
    padded = m.padded_vocab_size(tp)
    plan = conversion_plan(arch, m, padded)
    files = safetensors_files(hf_dir)
    check_hf_tensors(plan, _hf_shapes(files), m.tie_embeddings)   # fail before any heavy work

    cfg = Config(model=m)
    cfg.run.dir = str(out)
    cfg.parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp)
    model = _build_single(Config(model=dataclasses.replace(m)), padded)
    state = model.state_dict()                   # views of the parameters: copy_ fills the model
    by_source = {name: e for e in plan for name, _ in e.sources}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    filled = set()
    with torch.no_grad():
        for name, tensor in _stream_hf(files):
            e = by_source.get(name)
            if e is None:                        # ignored (inv_freq, tied lm_head): checked above
                continue
            parts = pending.setdefault(e.target, {})
            parts[name] = tensor
            if len(parts) < len(e.sources):
                continue
            value = e.to_megatron([parts[n] for n, _ in e.sources])
            dst = state[e.target]
            if value.shape != dst.shape:
                raise ConversionError(f"tensor {e.target}: built shape {list(value.shape)} != model's "
                                      f"{list(dst.shape)}")
            dst.copy_(value)
            del pending[e.target]
            filled.add(e.target)
    missing = [e.target for e in plan if e.target not in filled]
    if missing:
        raise ConversionError(f"tensor {missing[0]}: not filled (sources {pending.get(missing[0])})")

    from megatron.core import dist_checkpointing

    rank0 = dist.get_rank() == 0
    root = out / "checkpoints"
    final, tmp = root / "iter_0000000", root / "iter_0000000.tmp"
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for p in (tmp, final):
            if p.exists():
                shutil.rmtree(p)
        tmp.mkdir(parents=True)
    dist.barrier()
    sharded = model.sharded_state_dict()
    rename_sharded_keys(sharded, "local", spec)      # checkpoint keys in the target spec's names
    dist_checkpointing.save({"model": sharded}, str(tmp))
    dist.barrier()
    if rank0:
        meta = {"step": 0, "consumed": 0, "layout": {"tp": tp, "pp": pp, "vpp": None, "dp": 1},
                "layer_spec": spec, "converted_from": str(hf_dir), "architecture": arch}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(final)
        (root / "latest").write_text(final.name)
        (out / "hf_config.json").write_text(json.dumps(hf, indent=1))
        copied = copy_tokenizer(hf_dir, out)
        if {"tokenizer.json", "tokenizer.model"} & set(copied):   # the trainer's pivot tokenizer
            cfg.data.tokenizer = str(out)
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    return final


def _find_run_files(src: Path, ckpt: Path) -> tuple[Path, Config, list[Path]]:
    """(config.yaml path, its Config, dirs to look in for hf_config.json / tokenizer files)."""
    from megatron_fusion.config import load_config

    cfg_path = next((c for c in (src / "config.yaml", ckpt.parent.parent / "config.yaml")
                     if c.is_file()), None)
    if cfg_path is None:
        raise ConversionError(f"{src}: no config.yaml (looked in {src} and {ckpt.parent.parent})")
    cfg = load_config(cfg_path)
    dirs = [cfg_path.parent]
    if cfg.checkpoint.load:                      # a run started from a converted dir
        dirs.append(Path(cfg.checkpoint.load))
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_dir():
        dirs.append(Path(cfg.data.tokenizer))
    return cfg_path, cfg, dirs


def hf_config_for(m: ModelConfig, arch: str, base: dict | None, dtype: str) -> dict:
    """config.json: the original HF config (when known) with the architecture fields of ``m``."""
    import transformers

    family = SUPPORTED_ARCHITECTURES[arch]
    fields = dict(num_hidden_layers=m.num_layers, hidden_size=m.hidden_size,
                  num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.num_query_groups or m.num_attention_heads,
                  head_dim=m.head_dim, intermediate_size=m.ffn_size, vocab_size=m.vocab_size,
                  max_position_embeddings=m.max_position_embeddings or m.seq_length,
                  rms_norm_eps=m.norm_epsilon, tie_word_embeddings=m.tie_embeddings, hidden_act="silu")
    rope = rope_parameters_for(m)
    if base is None:
        fields["rope_parameters"] = rope
        if family == "phi3":
            fields.pop("head_dim")
        out = transformers.AutoConfig.for_model(family, **fields).to_dict()
    else:
        out = dict(base)
        out.update({k: v for k, v in fields.items() if k != "head_dim" or "head_dim" in base})
        _set_rope(out, rope)
    out["architectures"] = [arch]
    out["dtype"] = dtype
    out.pop("torch_dtype", None)
    return out


def _set_rope(hf: dict, rope: dict) -> None:
    """Write ``rope`` into an HF config dict in the layout it already uses: transformers 5's
    ``rope_parameters`` (theta inside), or 4.x's ``rope_theta`` + ``rope_scaling`` (None when plain)."""
    if "rope_parameters" in hf or "rope_theta" not in hf:
        params = dict(hf.get("rope_parameters") or {})
        for k in ("rope_type", "type", *LLAMA3_ROPE_FIELDS):
            params.pop(k, None)
        hf["rope_parameters"] = {**params, **rope}
        return
    hf["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    hf["rope_scaling"] = scaling if scaling["rope_type"] != "default" else None


def megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, *, arch: str | None = None,
                   dtype: str | None = None, max_shard_bytes: int = 2 << 30) -> Path:
    """Write a Megatron run/checkpoint as an HF dir (safetensors shards, config.json, tokenizer).

    ``arch``: the HF architecture (default: the one the run was converted from, else Llama, or
    Qwen2 with a QKV bias). ``dtype``: of the written tensors (default: the original's, else fp32).
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_fusion.checkpoint import load_model_weights, resolve_checkpoint

    src = Path(megatron_dir)
    ckpt = resolve_checkpoint(src)
    cfg_path, cfg, dirs = _find_run_files(src, ckpt)
    m = cfg.model
    if m.vocab_size <= 0:
        raise ConversionError(f"{cfg_path}: model.vocab_size is {m.vocab_size}; need the true size")
    if m.normalization != "RMSNorm" or not m.swiglu:
        raise ConversionError(f"{cfg_path}: only RMSNorm + SwiGLU models convert to HF")
    base = next((json.loads((d / "hf_config.json").read_text()) for d in dirs
                 if (d / "hf_config.json").is_file()), None)
    arch = arch or ((base or {}).get("architectures") or [None])[0] or (
        "Qwen2ForCausalLM" if m.add_qkv_bias else "Qwen3ForCausalLM" if m.qk_layernorm
        else "LlamaForCausalLM")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if m.add_qkv_bias != (SUPPORTED_ARCHITECTURES[arch] == "qwen2"):
        raise ConversionError(f"{cfg_path}: model.add_qkv_bias={m.add_qkv_bias} does not fit {arch}")
    if m.qk_layernorm != (SUPPORTED_ARCHITECTURES[arch] == "qwen3"):
        raise ConversionError(f"{cfg_path}: model.qk_layernorm={m.qk_layernorm} does not fit {arch}")
    dtype = dtype or (base or {}).get("dtype") or (base or {}).get("torch_dtype") or "float32"
    torch_dtype = getattr(torch, dtype)

    meta = json.loads((ckpt / "meta.json").read_text())
    padded = m.padded_vocab_size(int(meta.get("layout", {}).get("tp", cfg.parallel.tp)))
    cfg.train.recompute = None
    model = _build_single(cfg, padded)
    load_model_weights(ckpt, [model])
    state = model.state_dict()
    plan = conversion_plan(arch, m, padded)

    out = Path(out_dir)
    rank0 = dist.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("model*.safetensors*"):
            old.unlink()
        shards, weight_map, buf, size = [], {}, {}, 0

        def flush():
            nonlocal buf, size
            if buf:
                name = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(buf, str(out / name), metadata={"format": "pt"})
                shards.append(name)
                weight_map.update({k: name for k in buf})
                buf, size = {}, 0

        for e in plan:
            with torch.no_grad():
                tensors = e.to_hf(state[e.target].detach())
            for (name, shape), t in zip(e.sources, tensors):
                if tuple(t.shape) != tuple(shape):
                    raise ConversionError(f"tensor {e.target} -> {name}: shape {list(t.shape)} != "
                                          f"{list(shape)}")
                buf[name] = t.to(torch_dtype).contiguous().clone()
                size += buf[name].numel() * buf[name].element_size()
            if size >= max_shard_bytes:
                flush()
        flush()
        n = len(shards)
        final_names = {s: (f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
                       for i, s in enumerate(shards)}
        for s, f in final_names.items():
            (out / s).rename(out / f)
        if n > 1:
            total = sum(state[e.target].numel() for e in plan) * torch.tensor([], dtype=torch_dtype).element_size()
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: final_names[v] for k, v in weight_map.items()}}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        hf_cfg = hf_config_for(m, arch, base, dtype)
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=1))
        for d in dirs:
            if copy_tokenizer(d, out):
                break
    dist.barrier()
    return out


# --- logits on both sides (check_conversion, tests) -----------------------------------------

@torch.no_grad()
def megatron_logits(megatron_dir: str | Path, tokens: torch.Tensor, tp: int = 1, pp: int = 1) -> torch.Tensor:
    """Collective over the world: the run's logits [b, s, vocab] (fp32, padding dropped) at
    layout tp x pp, returned on every rank. Pipeline stages pass hidden states point to point."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_fusion.checkpoint import load_model_weights, resolve_checkpoint
    from megatron_fusion.model import build_model
    from megatron_fusion.parallel import init_student_groups

    src = Path(megatron_dir)
    ckpt = resolve_checkpoint(src)
    _, cfg, _ = _find_run_files(src, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    padded = cfg.model.padded_vocab_size(int(meta.get("layout", {}).get("tp", 1)))
    groups = init_student_groups(tp, pp)
    cfg.parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, vpp=None, sequence_parallel=False)
    cfg.train.recompute = None
    with torch.random.fork_rng():
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        model = build_model(cfg, vocab_size=padded)[0].eval()
    load_model_weights(ckpt, [model])

    dev = groups.device                                  # this rank's device (cuda:LOCAL_RANK or cpu)
    tokens = tokens.to(dev)
    b, s = tokens.shape
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    if groups.is_first_stage:
        out = model(tokens, pos, None)
    else:
        hidden = torch.empty(s, b, cfg.model.hidden_size, device=dev,
                             dtype=next(model.parameters()).dtype)               # [s, b, h]
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        out = model(None, pos, None)
    if not groups.is_last_stage:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        logits = torch.empty(b, s, padded, device=dev)
    else:                                                                       # [b, s, v/tp]
        shards = [torch.empty_like(out) for _ in range(groups.tp_size)]
        dist.all_gather(shards, out.contiguous(), group=groups.tp)
        logits = torch.cat(shards, dim=-1).float()                              # [b, s, v]
    is_src = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0
    src_rank = torch.tensor([dist.get_rank() if is_src else -1], device=dev)
    dist.all_reduce(src_rank, op=dist.ReduceOp.MAX)
    dist.broadcast(logits, src=int(src_rank))
    return logits[..., :cfg.model.vocab_size].cpu()


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """The HF model's logits [b, s, vocab] in fp32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    return model(input_ids=tokens).logits.float()


def random_tokens(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def _ranks_logits(rank, world, megatron_dir, tokens, tp, pp):
    logits = megatron_logits(megatron_dir, tokens, tp, pp)     # collective: every rank calls it
    return logits if rank == 0 else None


def check_conversion(hf_dir: str | Path, megatron_dir: str | Path, *, tp: int = 1, pp: int = 1,
                     batch: int = 2, seq: int = 16, seed: int = 0) -> float:
    """Max |HF logits - Megatron logits| on the same random tokens (Megatron on tp*pp gloo ranks)."""
    from megatron_fusion.local_ranks import run_on_ranks

    vocab = int(read_hf_config(hf_dir)["vocab_size"])
    tokens = random_tokens(vocab, batch, seq, seed)
    ref = hf_logits(hf_dir, tokens)
    got = run_on_ranks(_ranks_logits, tp * pp, (str(megatron_dir), tokens, tp, pp), timeout_s=600)[0]
    if got.shape != ref.shape:
        raise ConversionError(f"logits shape {list(got.shape)} (Megatron) != {list(ref.shape)} (HF)")
    return float((got - ref).abs().max())


# --- CLIs -----------------------------------------------------------------------------------

def single_process(fn, *args, **kw):
    """Run ``fn`` in this process as a world of one (gloo), then shut the group down."""
    import torch.distributed as dist

    from megatron_fusion.parallel import destroy_student_groups, init_distributed

    init_distributed()
    try:
        return fn(*args, **kw)
    finally:
        destroy_student_groups()
        if dist.is_initialized():
            dist.destroy_process_group()
