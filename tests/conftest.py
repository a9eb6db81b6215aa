"""Shared fixtures: demo data (synthetic tasks + tiny pivot tokenizer) made once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from megatron_fusion.data.tiny import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo_data"), n_train=200, n_valid=16)


@pytest.fixture(scope="session")
def fuse_data(demo_data, tmp_path_factory):
    """Two tiny random HF-Llama teachers with their own tokenizers (byte-level BPE and a
    SentencePiece BPE), their top-K precomputed over the demo SFT set at seq_length 64."""
    import json

    import torch
    import transformers

    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.teachers.backends import HFTeacherBackend
    from megatron_fusion.teachers.precompute import precompute_teacher_topk
    from megatron_fusion.tokenizers import load_tokenizer, train_byte_bpe, train_sentencepiece

    d = tmp_path_factory.mktemp("fuse")
    texts = [json.loads(line)["prompt"] + "\n" + json.loads(line)["response"]
             for line in open(demo_data["train"])]
    pivot = load_tokenizer(demo_data["pivot_tokenizer"])
    ds = SFTDataset(demo_data["train"], pivot, 64)
    toks = {"tA": train_byte_bpe(texts, 400, d / "tA_tok"),
            "tB": train_sentencepiece(texts, 600, d / "tB.model", model_type="bpe")}
    paths = {"tA": str(d / "tA_tok"), "tB": str(d / "tB.model")}
    teachers = []
    for i, (name, tok) in enumerate(toks.items()):
        torch.manual_seed(100 + i)
        cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=256)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():
            model.lm_head.weight.mul_(20)
        out = d / f"{name}_topk"
        precompute_teacher_topk(ds, tok, HFTeacherBackend(model=model), out, teacher=name,
                                progress=False, samples_per_shard=64, batch_size=8)
        teachers.append({"name": name, "tokenizer": paths[name], "topk_dir": str(out)})
    return {"teachers": teachers, "dir": str(d)}
