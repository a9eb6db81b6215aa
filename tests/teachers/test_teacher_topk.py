"""Offline teacher top-K and source log-probs with a tiny random HF Llama teacher (built locally).

Checks: stored top-K == standardized_topk of the teacher's full logits at the aligned positions;
stored per-sample teacher CE == a direct log-softmax over the teacher's response tokens (per
token, and per byte of the text they span);
kill-and-resume gives byte-identical shards; teacher TP2 (vocab split over 2 gloo ranks) == TP1;
source log-probs == a direct log-softmax sum, at TP1 and TP2.
"""

import filecmp

import pydoc_data.topics as topics
import pytest
import torch

from megatron_fusion.data import PreferenceDataset, SFTDataset
from megatron_fusion.data.sft import encode_segments
from megatron_fusion.data.synthetic import write_synthetic
from megatron_fusion.losses import standardized_topk
from megatron_fusion.teachers.source_logprobs import precompute_source_logprobs
from megatron_fusion.teachers.backends import HFTeacherBackend, VocabShardedBackend
from megatron_fusion.teachers.precompute import expected_header, precompute_teacher_topk
from megatron_fusion.teachers.topk import teacher_inputs
from megatron_fusion.local_ranks import run_on_ranks
from megatron_fusion.tokenizers import load_tokenizer, train_byte_bpe, train_sentencepiece
from megatron_fusion.teachers.shards import SourceLogprobStore, TopKReader

transformers = pytest.importorskip("transformers", reason="the HF teacher backend needs transformers")

SEQ = 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    corpus = list(topics.topics.values())[:40]
    pivot_tok = train_sentencepiece(corpus, 700, d / "pivot.model")
    teacher_tok = train_byte_bpe(corpus, 601, d / "teacher_tok")    # odd vocab: uneven TP split
    files = write_synthetic(d / "data", 10, seed=1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=teacher_tok.vocab_size, hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the logits so that the top-K is far from ties
        model.lm_head.weight.mul_(20)
    model.save_pretrained(d / "model")
    return {"dir": d, "pivot_tok": pivot_tok, "teacher_tok": teacher_tok, "files": files}


def _run(s, out, backend=None, **kw):
    ds = SFTDataset(s["files"]["sft"], s["pivot_tok"], SEQ)
    backend = backend or HFTeacherBackend(s["dir"] / "model")
    kw.setdefault("samples_per_shard", 4)
    summary = precompute_teacher_topk(ds, s["teacher_tok"], backend, out, teacher="tiny",
                                      progress=False, **kw)
    return ds, summary


def test_stored_topk_equals_full_logits(setup):
    s = setup
    out = s["dir"] / "tp1"
    ds, summary = _run(s, out, batch_size=1)
    assert summary["shards"] == 3 and summary["aligned_fraction"] > 0.5
    reader = TopKReader(out, expected=expected_header(ds, "tiny", s["teacher_tok"]))
    model = HFTeacherBackend(s["dir"] / "model").model
    n_checked = n_cut = 0
    for i in range(len(ds)):
        smp = ds.sample(i)
        P = min(len(smp.ids), SEQ)
        t_ids, t_offs, t_labels, t_resp = teacher_inputs(smp, s["teacher_tok"], P,
                                                         with_labels=True)
        with torch.no_grad():
            z = model(torch.tensor([t_ids])).logits.float()           # [1, T, v]
        # teacher CE: position j predicts token j+1, counted where token j+1 is a response token
        lsm = torch.log_softmax(z[0].double(), -1)                    # [T, v]
        # labels = the next tokens; one more (past the input cut) when the pivot's labels reach it
        assert t_labels[:len(t_ids) - 1] == t_ids[1:]
        assert len(t_labels) in (len(t_ids) - 1, len(t_ids))
        n_cut += len(t_labels) == len(t_ids)
        js = [j for j in range(len(t_labels)) if t_resp[j]]
        ref_ce = -sum(lsm[j, t_labels[j]].item() for j in js) / len(js)
        assert reader.teacher_ce_tokens([smp.sample_id]).tolist() == [len(js)] and js
        assert abs(reader.teacher_ce([smp.sample_id]).item() - ref_ce) <= 1e-5 * abs(ref_ce)
        # per byte (what minCE / avgCE compare): the UTF-8 bytes of the characters those tokens span
        _, all_offs, _, text = encode_segments(s["teacher_tok"], smp.segments)
        chars = {c for j in js for c in range(*all_offs[j + 1])}
        n_bytes = sum(len(text[c].encode()) for c in chars)
        assert reader.teacher_ce_bytes([smp.sample_id]).tolist() == [n_bytes] and n_bytes
        ref_byte = ref_ce * len(js) / n_bytes
        assert abs(reader.teacher_ce_byte([smp.sample_id]).item() - ref_byte) <= 1e-5 * ref_byte
        ref_v, ref_i = standardized_topk(z, 10, vocab_size=z.shape[-1])
        # plain formula as well: population z-score over the full vocab, then top-K
        zs = (z - z.mean(-1, keepdim=True)) / (z.std(-1, unbiased=False, keepdim=True) + 1e-6)
        plain_v, plain_i = zs.topk(10, dim=-1)
        assert torch.equal(plain_i, ref_i)
        assert torch.allclose(plain_v, ref_v, atol=1e-4)
        v, ids, mask, logp = reader.get(smp.sample_id, seq_len=SEQ, logprobs=True)
        d = z.std(-1, unbiased=False)[0] + 1e-6                       # [T]: sigma + eps
        for t in mask.nonzero().squeeze(1).tolist():
            # the context of pivot position t ends where the teacher's aligned position's does
            j = [jj for jj, (a, b) in enumerate(t_offs) if b == smp.offsets[t][1] and a < b][-1]
            assert torch.equal(ids[t], ref_i[0, j])
            # format 4 (the default): the teacher's log-probs to the 16-bit code's 2^-11, and
            # the standardised values derived from them to that over sigma + eps
            assert (logp[t].double() - lsm[j, ref_i[0, j]]).abs().max() <= 2 ** -11 + 1e-6
            assert (v[t] - ref_v[0, j]).abs().max() <= (2 ** -11 + 1e-6) / d[j] + 1e-5
            n_checked += 1
        # never outside the response positions
        item = ds[i]
        assert not (mask & (item["loss_mask"] == 0)).any()
    assert n_checked > 100 and n_cut > 0


def test_kill_and_resume_byte_identical(setup):
    s = setup
    ref_dir, kill_dir = s["dir"] / "ref", s["dir"] / "kill"
    _run(s, ref_dir, batch_size=2)

    class Dies(HFTeacherBackend):
        calls = 0

        def local_logits(self, input_ids):
            Dies.calls += 1
            if Dies.calls == 4:                      # in the middle of the second shard
                raise KeyboardInterrupt("killed")
            return super().local_logits(input_ids)

    with pytest.raises(KeyboardInterrupt):
        _run(s, kill_dir, backend=Dies(s["dir"] / "model"), batch_size=2)
    assert sorted(p.name for p in kill_dir.iterdir()) == ["tiny-00000.topk"]  # no partial files
    _, summary = _run(s, kill_dir, batch_size=2)
    assert summary["skipped_shards"] == 1
    names = sorted(p.name for p in ref_dir.iterdir())
    assert names == sorted(p.name for p in kill_dir.iterdir()) and len(names) == 3
    assert all(filecmp.cmp(ref_dir / n, kill_dir / n, shallow=False) for n in names)
    # a finished run re-started skips everything; a different K is refused, naming the field
    _, summary = _run(s, kill_dir, batch_size=2)
    assert summary["skipped_shards"] == 3
    with pytest.raises(ValueError, match="header field 'k'"):
        _run(s, kill_dir, batch_size=2, k=5)


def test_mined_alignment_backend_run(setup):
    s = setup
    with pytest.warns(UserWarning, match="pivot response positions aligned"):  # tiny tokenizers
        ds, summary = _run(s, s["dir"] / "mined", alignment="mined", samples_per_shard=10,
                           threshold=0.99)
    _, off_summary = _run(s, s["dir"] / "tp1b", samples_per_shard=10)
    assert 0 < summary["aligned_fraction"] <= off_summary["aligned_fraction"] + 1e-9
    mined = TopKReader(s["dir"] / "mined")
    off = TopKReader(s["dir"] / "tp1b")
    for sid in mined.sample_ids:
        vm, im, mm = mined.get(sid)
        vo, io, mo = off.get(sid)
        both = mm & mo                               # where both align they pick the same row
        assert torch.equal(im[both], io[both]) and torch.equal(vm[both], vo[both])


def _tp_worker(rank, world, model_dir, tok_dir, pivot_model, sft, pref, out, out_logp):
    import torch.distributed as dist

    pivot_tok = load_tokenizer(pivot_model)
    teacher_tok = load_tokenizer(tok_dir)
    full = HFTeacherBackend(model_dir)
    backend = VocabShardedBackend(full, dist.group.WORLD, pad_multiple=8)
    ds = SFTDataset(sft, pivot_tok, SEQ)
    precompute_teacher_topk(ds, teacher_tok, backend, out, teacher="tiny", samples_per_shard=4,
                            batch_size=2, write=rank == 0, progress=False)
    pds = PreferenceDataset(pref, teacher_tok, SEQ)
    precompute_source_logprobs(pds, backend, out_logp, source="tiny", samples_per_shard=4,
                               write=rank == 0, progress=False)
    return backend.v_local


def test_tp2_equals_tp1_and_source_logprobs(setup):
    s = setup
    tp1, tp2 = s["dir"] / "tp1c", s["dir"] / "tp2"
    lp1, lp2 = s["dir"] / "lp1", s["dir"] / "lp2"
    _run(s, tp1, batch_size=2)
    backend = HFTeacherBackend(s["dir"] / "model")
    pds = PreferenceDataset(s["files"]["preference"], s["teacher_tok"], SEQ)
    precompute_source_logprobs(pds, backend, lp1, source="tiny", samples_per_shard=4, progress=False)
    v_local = run_on_ranks(_tp_worker, 2, args=(
        str(s["dir"] / "model"), str(s["dir"] / "teacher_tok"), str(s["dir"] / "pivot.model"),
        str(s["files"]["sft"]), str(s["files"]["preference"]), str(tp2), str(lp2)))
    assert v_local == [304, 304]                      # 601 padded to 608: rank 1 holds 7 pad columns
    r1, r2 = TopKReader(tp1), TopKReader(tp2)
    assert r1.sample_ids == r2.sample_ids and r1.header == r2.header
    n_vals = n_exact = 0
    for sid in r1.sample_ids:
        v1, i1, m1, l1 = r1.get(sid, logprobs=True)
        v2, i2, m2, l2 = r2.get(sid, logprobs=True)
        assert torch.equal(m1, m2) and torch.equal(i1, i2)
        # logsumexp, mean and std come from per-shard partial sums at TP2: equal up to fp32
        # rounding, which can move a log-prob by one step of the 16-bit code (2^-10) and the
        # values derived from it (a / (sigma + eps), fp32 d and c) by a few fp32 ulps
        assert torch.allclose(l1, l2, rtol=0, atol=2 ** -10)
        assert torch.allclose(v1, v2, rtol=1e-5, atol=2 ** -10)
        n_vals += l1.numel()
        n_exact += int((l1 == l2).sum())
    assert n_exact >= 0.95 * n_vals
    ids_ = r1.sample_ids
    assert torch.equal(r1.teacher_ce_tokens(ids_), r2.teacher_ce_tokens(ids_))
    assert (r1.teacher_ce_tokens(ids_) > 0).all()
    assert torch.allclose(r1.teacher_ce(ids_), r2.teacher_ce(ids_), rtol=1e-5, atol=0)

    # source log-probs: TP1 == TP2 == a direct log-softmax over the tiny model's logits
    st1, st2 = SourceLogprobStore(lp1), SourceLogprobStore(lp2)
    assert len(st1) == len(st2) == len(pds) == 10
    model = backend.model
    for i in range(len(pds)):
        item = pds[i]
        a, b = st1.get(item["sample_id"]), st2.get(item["sample_id"])
        for side in ("chosen", "rejected"):
            toks, labels, mask = (item[f"{side}_{k}"] for k in ("tokens", "labels", "loss_mask"))
            with torch.no_grad():
                lsm = torch.log_softmax(model(toks[None]).logits.double()[0], -1)
            ref = (lsm.gather(-1, labels[:, None])[:, 0] * mask.double()).sum().item()
            assert a[f"{side}_tokens"] == b[f"{side}_tokens"] == int(mask.sum())
            assert abs(a[f"{side}_logprob"] - ref) < 1e-3 * max(1.0, abs(ref))
            assert abs(a[f"{side}_logprob"] - b[f"{side}_logprob"]) < 1e-3 * max(1.0, abs(ref))


def test_cli_tools(setup, capsys):
    from megatron_fusion.cli import precompute_logprobs_main, precompute_topk_main

    s = setup
    d = s["dir"]
    summary = precompute_topk_main([
        "--data", str(s["files"]["sft"]), "--pivot-tokenizer", str(d / "pivot.model"),
        "--teacher-model", str(d / "model"), "--teacher-tokenizer", str(d / "teacher_tok"),
        "--teacher-name", "tiny", "--out", str(d / "cli"), "--seq-len", str(SEQ),
        "--samples-per-shard", "4", "--batch-size", "2", "--no-progress",
        "--cache-dir", str(d / "cache")])
    assert summary["shards"] == 3 and '"aligned_fraction"' in capsys.readouterr().out
    assert (summary["device"], summary["model_dtype"]) == ("cpu", "float32")   # CPU defaults
    if not (d / "ref").exists():  # the resume test writes it with the same settings
        _run(s, d / "ref", batch_size=2)
    ref = sorted((d / "ref").iterdir())
    assert len(ref) == 3 and all(filecmp.cmp(p, d / "cli" / p.name, shallow=False) for p in ref)
    summary = precompute_logprobs_main([
        "--data", str(s["files"]["preference"]), "--source-model", str(d / "model"),
        "--source-tokenizer", str(d / "teacher_tok"), "--source-name", "tiny",
        "--out", str(d / "cli_logp"), "--seq-len", str(SEQ), "--no-progress",
        "--device", "cpu", "--dtype", "bf16"])
    assert summary["pairs"] == 10 and len(SourceLogprobStore(d / "cli_logp")) == 10
    assert (summary["device"], summary["model_dtype"]) == ("cpu", "bfloat16")
