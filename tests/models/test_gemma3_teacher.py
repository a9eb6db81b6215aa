"""Gemma-3 as a teacher through the HF backend (docs/models.md): the online path's
``build_backend`` at tp=2 (full model on each rank, vocab-sharded logits) on a tiny random
Gemma3ForCausalLM with sliding-window and global layers and an embedding padded past its tokenizer.

Checked: the backend's logits equal a separately loaded transformers model's (eager attention,
sequences longer than the sliding window); the distributed top-K over the two vocab shards equals
the full model's; no top-K id is a padding row even where those rows have the largest logits
(the true vocabulary is the tokenizer's). The Megatron-side conversion of Gemma is refused by name
(tests/test_convert.py). ~15 s of work on 2 idle cores (rank start-up most of it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SEQ = 64
PADDING_ROWS = 40


def _make_gemma3(root: Path, train_jsonl: str) -> Path:
    import transformers

    from megatron_fusion.tokenizers import train_sentencepiece

    texts = [json.loads(line)["prompt"] + "\n" + json.loads(line)["response"]
             for line in Path(train_jsonl).read_text().splitlines()]
    out = root / "gemma3"
    tok = train_sentencepiece(texts, 600, out / "tokenizer.model", model_type="bpe")
    torch.manual_seed(3)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=tok.vocab_size + PADDING_ROWS, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256)
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():                      # tied head: spread the logits, padding rows largest
        emb = model.model.embed_tokens.weight
        emb.mul_(20)
        emb[tok.vocab_size:] = emb[:tok.vocab_size].abs().max() * 5
    model.save_pretrained(out)
    return out


def _gemma3_ranks(rank, world, data, model_dir):
    import transformers

    from megatron_fusion.config import TeacherConfig
    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.parallel import init_student_groups
    from megatron_fusion.teachers.backends import VocabShardedBackend
    from megatron_fusion.teachers.online.protocol import ALIGNMENT, EPS
    from megatron_fusion.teachers.online.server import build_backend
    from megatron_fusion.teachers.topk import compute_batch_topk
    from megatron_fusion.tokenizers import load_tokenizer

    groups = init_student_groups(tp=2)
    t = TeacherConfig(name="gemma3", source="online", backend="hf", checkpoint=model_dir, ranks=2, tp=2)
    backend, tok_spec = build_backend(t, groups)
    assert isinstance(backend, VocabShardedBackend) and tok_spec == model_dir
    pivot, teacher_tok = load_tokenizer(data["pivot_tokenizer"]), load_tokenizer(tok_spec)

    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ids = torch.randint(0, teacher_tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits                                  # [b, s, v]
        logit_diff = float((backend.full.local_logits(ids) - want).abs().max() / want.abs().max())

    ds = SFTDataset(data["train"], pivot, SEQ)
    samples = [ds.sample(i) for i in range(8)]
    kw = dict(k=10, eps=EPS, alignment=ALIGNMENT, max_teacher_len=None)
    sharded = compute_batch_topk(samples, backend, teacher_tok, pivot, SEQ, **kw)
    full = compute_batch_topk(samples, backend.full, teacher_tok, pivot, SEQ, **kw)
    for a, b in zip(sharded, full):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.aligned_mask, b.aligned_mask)
        assert torch.allclose(a.values, b.values, rtol=1e-5, atol=1e-5)
    aligned = [a.ids[a.aligned_mask] for a in sharded]
    max_id = max(int(x.max()) for x in aligned if x.numel())
    return logit_diff, max_id, teacher_tok.vocab_size, sum(int(x.shape[0]) for x in aligned)


@pytest.mark.dist
def test_gemma3_online_hf_teacher(demo_data, tmp_path):
    from megatron_fusion.local_ranks import run_on_ranks

    model_dir = _make_gemma3(tmp_path, demo_data["train"])
    out = run_on_ranks(_gemma3_ranks, 2, (demo_data, str(model_dir)))
    assert out[0] == out[1], out
    logit_diff, max_id, true_vocab, n_aligned = out[0]
    assert logit_diff <= 1e-6, logit_diff            # relative to the largest logit (fp32)
    assert n_aligned > 50 and max_id < true_vocab, out[0]


def test_gemma3_multimodal_checkpoint_is_a_text_teacher(tmp_path):
    """Gemma-3 4B / 12B / 27B are Gemma3ForConditionalGeneration checkpoints (vocab_size in
    text_config): the HF backend opens one and its logits on text are the model's."""
    import transformers

    from megatron_fusion.teachers.backends import open_backend

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "g3")
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    with open_backend("hf", model_dir=tmp_path / "g3", device="cpu", dtype="fp32") as (backend, spec, writer):
        assert type(backend.model).__name__ == "Gemma3ForConditionalGeneration"
        assert backend.vocab_size == 300 and writer and Path(spec) == tmp_path / "g3"
        got = backend.local_logits(ids)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())
