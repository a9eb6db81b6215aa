"""Synthetic data, JSONL errors, SFT and preference datasets (layout, counts, cache)."""

import json
import os

import pytest
import torch

from megatron_fusion.data import JSONLError, PreferenceDataset, SFTDataset, read_jsonl
from megatron_fusion.data import synthetic
from megatron_fusion.tokenizers import load_tokenizer, train_byte_bpe

mistral_common = pytest.importorskip("mistral_common", reason="mistral-common ships the real SP v1 model")
SP_V1 = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(SP_V1)


@pytest.fixture(scope="module")
def bbpe(tmp_path_factory):
    import pydoc_data.topics as topics

    return train_byte_bpe(list(topics.topics.values())[:40], 1200,
                          tmp_path_factory.mktemp("tok") / "bbpe")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return synthetic.write_synthetic(tmp_path_factory.mktemp("data"), 40, seed=3)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_synthetic_answers_check_and_seeded(tmp_path):
    for r in synthetic.arithmetic_problems(200, seed=1):
        assert r["response"].endswith(f"The answer is {r['answer']}.")
        # every step in the worked response is right
        for step in r["response"].split(": ")[1:]:
            expr = step.split(" = ")
            if len(expr) >= 2 and all(c in "0123456789+-* " for c in expr[0]):
                assert eval(expr[0]) == int(expr[1].split(".")[0].split(",")[0])
    for r in synthetic.string_tasks(200, seed=1):
        assert str(r["answer"]) in r["response"]
    for r in synthetic.preference_pairs(200, seed=1):
        assert r["chosen"] != r["rejected"]
        assert str(r["answer"]) in r["chosen"]
    assert synthetic.sft_mix(50, 7) == synthetic.sft_mix(50, 7)
    assert synthetic.sft_mix(50, 7) != synthetic.sft_mix(50, 8)
    a = synthetic.write_synthetic(tmp_path / "a", 20, 5)
    b = synthetic.write_synthetic(tmp_path / "b", 20, 5)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)


def test_jsonl_errors_name_file_and_line(tmp_path, sp):
    bad = _write(tmp_path / "bad.jsonl", ['{"prompt": "a", "response": "b"}', "",
                                          '{"prompt": "a", "response": "b"', ])
    with pytest.raises(JSONLError, match=r"bad\.jsonl:3: not valid JSON"):
        list(read_jsonl(bad))
    with pytest.raises(JSONLError, match=r"bad\.jsonl:3"):
        SFTDataset(bad, sp, 32)
    missing = _write(tmp_path / "missing.jsonl", ['{"prompt": "a", "response": "b"}',
                                                  '{"prompt": "a"}'])
    with pytest.raises(JSONLError, match=r"missing\.jsonl:2: expected 'prompt' and 'response'"):
        SFTDataset(missing, sp, 32)
    notobj = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(JSONLError, match=r"list\.jsonl:1: expected a JSON object"):
        SFTDataset(notobj, sp, 32)
    wrongtype = _write(tmp_path / "pref.jsonl", ['{"prompt": "a", "chosen": 3, "rejected": "c"}'])
    with pytest.raises(JSONLError, match=r"pref\.jsonl:1: field 'chosen' must be a string"):
        PreferenceDataset(wrongtype, sp, 32)
    badmsg = _write(tmp_path / "msg.jsonl", ['{"messages": [{"role": "user"}]}'])
    with pytest.raises(JSONLError, match=r"msg\.jsonl:1: 'messages' must be"):
        SFTDataset(badmsg, sp, 32)


def test_sft_layout(files, sp, bbpe):
    for tok in (sp, bbpe):
        ds = SFTDataset(files["sft"], tok, 256)
        assert ds.stats.kept == ds.stats.records == 40 and ds.stats.truncated == 0
        for i in range(len(ds)):
            item, s = ds[i], ds.sample(i)
            tokens, labels, mask = item["tokens"], item["labels"], item["loss_mask"]
            assert tokens.dtype == labels.dtype == torch.long and mask.dtype == torch.float32
            assert tokens.shape == labels.shape == mask.shape == (256,)
            n = len(s.ids)
            assert tokens[0] == tok.bos_id and s.ids[-1] == tok.eos_id
            assert torch.equal(labels[: n - 1], tokens[1:n])          # labels = tokens shifted
            assert (tokens[n:] == ds.pad_id).all() and (mask[n - 1:] == 0).all()
            resp_labels = labels[mask.bool()].tolist()
            assert resp_labels[-1] == tok.eos_id                     # EOS ending the response
            rec = json.loads(open(files["sft"]).readlines()[s.sample_id])
            assert tok.decode(resp_labels[:-1]).strip() == rec["response"]
            assert s.text == rec["prompt"] + rec["response"]
            assert s.response_spans == [(len(rec["prompt"]), len(s.text))]
            # offsets: every response token lies inside the response span
            a, b = s.response_spans[0]
            assert all(a <= st and en <= b for (st, en), r in zip(s.offsets.tolist(), s.is_response)
                       if r and en > st)
            assert item["sample_id"] == s.sample_id


def test_chat_messages(files, bbpe, sp):
    ds = SFTDataset(files["sft_chat"], bbpe, 256)
    plain = SFTDataset(files["sft"], bbpe, 256)
    for i in range(5):
        item = ds[i]
        resp = bbpe.decode(item["labels"][item["loss_mask"].bool()].tolist())
        rec = plain.sample(i)
        expected = rec.text[rec.response_spans[0][0]:]
        assert resp == expected + "<|im_end|>\n<|endoftext|>"
    with pytest.raises(JSONLError, match=r"sft_chat.jsonl:1: .*no chat template"):
        SFTDataset(files["sft_chat"], sp, 256)


def test_overflow_and_empty_are_counted(tmp_path, sp):
    long = "word " * 100
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "Q?", "response": "short answer"}),
        json.dumps({"prompt": "Q?", "response": long}),            # too long: truncated/rejected
        json.dumps({"prompt": "Q?", "response": "   "}),            # empty
        json.dumps({"prompt": long, "response": "x"}),              # response cut away entirely
    ])
    ds = SFTDataset(path, sp, 32, overflow="truncate", empty="skip")
    st = ds.stats
    assert (st.records, st.kept, st.truncated, st.skipped_empty, st.dropped_no_response) == (4, 2, 1, 1, 1)
    assert ds.sample_ids == [0, 1]
    # labels[0..len(prompt)-1] are prompt tokens, every later slot is a (truncated) response token
    assert ds[1]["loss_mask"].sum() == 32 - len(sp.encode("Q?"))
    assert ds.sample(1).truncated and len(ds.sample(1).ids) == 33
    assert len(st.details) == 2 and all(":" in d for d in st.details)
    ds = SFTDataset(path, sp, 32, overflow="reject", empty="skip")
    assert (ds.stats.kept, ds.stats.rejected_overflow, ds.stats.skipped_empty) == (1, 2, 1)
    with pytest.raises(JSONLError, match=r"d\.jsonl:3: empty response"):
        SFTDataset(path, sp, 32, empty="reject")
    with pytest.raises(JSONLError, match=r"d\.jsonl:2: sample has"):
        SFTDataset(path, sp, 32, overflow="error")
    with pytest.raises(ValueError, match="overflow must be"):
        SFTDataset(path, sp, 32, overflow="drop")


def test_cache_keyed_and_atomic(files, sp, bbpe, tmp_path):
    cache = tmp_path / "cache"
    a = SFTDataset(files["sft"], sp, 128, cache_dir=cache)
    b = SFTDataset(files["sft"], sp, 128, cache_dir=cache)
    assert not a.cache_hit and b.cache_hit and a.dataset_hash == b.dataset_hash
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    assert b.stats.as_dict() == a.stats.as_dict()
    c = SFTDataset(files["sft"], sp, 64, cache_dir=cache)                # other seq_len
    d = SFTDataset(files["sft"], bbpe, 128, cache_dir=cache)             # other tokenizer
    assert not c.cache_hit and not d.cache_hit
    assert len({a.dataset_hash, c.dataset_hash, d.dataset_hash}) == 3
    assert sorted(p.suffix for p in cache.iterdir()) == [".pkl"] * 3  # no temp files left
    # data file changes -> new key
    changed = tmp_path / "sft.jsonl"
    changed.write_bytes(files["sft"].read_bytes() + b'{"prompt": "p", "response": "r"}\n')
    e = SFTDataset(changed, sp, 128, cache_dir=cache)
    assert not e.cache_hit and len(e) == len(a) + 1


def test_preference_layout(files, sp):
    ds = PreferenceDataset(files["preference"], sp, 256)
    assert ds.stats.kept == 40
    recs = [json.loads(x) for x in open(files["preference"])]
    for i in range(len(ds)):
        item = ds[i]
        rec = recs[item["sample_id"]]
        for side in ("chosen", "rejected"):
            t, l, m = item[f"{side}_tokens"], item[f"{side}_labels"], item[f"{side}_loss_mask"]
            assert t.shape == l.shape == m.shape == (256,)
            resp = l[m.bool()].tolist()
            assert resp[-1] == sp.eos_id
            assert sp.decode(resp[:-1]) == rec[side]
            n = int((t != ds.pad_id).sum())
            assert torch.equal(l[: n - 1], t[1:n])
