"""Tokenizer adapters: real SentencePiece (Mistral v1) and a byte-level BPE trained on stdlib text."""

import hashlib
import os

import pytest

from megatron_fusion.tokenizers import (HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                        decode_accumulate_offsets, load_tokenizer,
                                        train_byte_bpe, train_sentencepiece)

mistral_common = pytest.importorskip("mistral_common", reason="mistral-common ships the real SP v1 model")
SP_V1 = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")

TEXTS = [
    "Hello  world\n\tdef f(x):\n        return x  # comment",
    "Unicode: é, 日本語, emoji 🙂, rare ꙮ𓀀 and ‘quotes’ — dash.",
    "numbers 3.14159 and 1e-10, tabs\tand trailing spaces   ",
]


def _corpus():
    import inspect
    import json.decoder
    import pydoc_data.topics as topics

    return list(topics.topics.values())[:80] + [inspect.getsource(json.decoder)]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = _corpus()
    return {
        "sp_v1": load_tokenizer(SP_V1),
        "sp_unigram": train_sentencepiece(corpus, 800, d / "uni.model", model_type="unigram"),
        "sp_bpe": train_sentencepiece(corpus, 800, d / "bpe.model", model_type="bpe"),
        "byte_bpe": train_byte_bpe(corpus, 1500, d / "bbpe"),
    }


def test_protocol_and_ids(toks):
    for name, tok in toks.items():
        assert isinstance(tok, Tokenizer), name
        assert len(tok.content_hash) == 64
        assert tok.eos_id is not None and 0 <= tok.eos_id < tok.vocab_size
    assert toks["sp_v1"].vocab_size == 32000
    assert (toks["sp_v1"].bos_id, toks["sp_v1"].eos_id) == (1, 2)
    assert toks["byte_bpe"].vocab_size == 1500
    with open(SP_V1, "rb") as f:
        assert toks["sp_v1"].content_hash == hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("name", ["sp_v1", "sp_unigram", "sp_bpe", "byte_bpe"])
def test_offsets_cover_text_and_roundtrip(toks, name):
    tok = toks[name]
    for text in TEXTS:
        ids, offs = tok.encode_with_offsets(text)
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text
        ends = [e for s, e in offs]
        assert ends == sorted(ends), "offsets must be monotonic"
        assert ends[-1] == len(text)
        assert all(0 <= s <= e <= len(text) for s, e in offs)
        # the decoded prefix after every token that has a non-empty span and is the last to end
        # there is exactly text[:end] (what alignment relies on)
        for i, (s, e) in enumerate(offs):
            last_at_end = i + 1 == len(offs) or offs[i + 1][1] != e
            if s < e and last_at_end:
                assert tok.decode(ids[: i + 1]).lstrip() == text[:e].lstrip(), (name, i)
        # decode-and-accumulate gives the same ends where SP/HF report them
        acc = decode_accumulate_offsets(tok, ids, text)
        assert [e for _, e in acc][-1] == len(text)


def test_byte_fallback_pieces_zero_width_until_complete(toks):
    tok = toks["sp_v1"]
    ids, offs = tok.encode_with_offsets("aꙮb")
    pieces = [tok.id_to_piece(i) for i in ids]
    assert "<0xEA>" in pieces
    # the three bytes of ꙮ all carry its span (as byte-level BPE pieces do); alignment takes the
    # last of them as the one after which the character is complete
    i = pieces.index("<0xEA>")
    assert offs[i] == offs[i + 1] == offs[i + 2] == (1, 2)
    assert offs[i - 1] == (0, 1) and offs[i + 3] == (2, 3)


def test_hash_stable_and_distinct(toks, tmp_path):
    corpus = _corpus()
    again = train_byte_bpe(corpus, 1500, tmp_path / "again")
    assert again.content_hash == toks["byte_bpe"].content_hash  # deterministic training + hash
    other = train_byte_bpe(corpus, 1400, tmp_path / "other")
    assert other.content_hash != toks["byte_bpe"].content_hash
    assert load_tokenizer(SP_V1).content_hash == toks["sp_v1"].content_hash


def test_load_tokenizer_dispatch(toks, tmp_path):
    assert isinstance(load_tokenizer(SP_V1), SentencePieceTokenizer)
    bdir = tmp_path / "b"
    train_byte_bpe(_corpus()[:10], 600, bdir)
    assert isinstance(load_tokenizer(bdir), HFTokenizer)
    assert isinstance(load_tokenizer(bdir / "tokenizer.json"), HFTokenizer)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_chat_template(toks):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    out = toks["byte_bpe"].apply_chat_template(msgs)
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    ids = toks["byte_bpe"].encode(out)
    assert ids[0] == toks["byte_bpe"].tk.token_to_id("<|im_start|>")  # special tokens kept whole
    with pytest.raises(NotImplementedError, match="no chat template"):
        toks["sp_v1"].apply_chat_template(msgs)


def test_training_is_fast(tmp_path):
    import time

    corpus = _corpus()
    t0 = time.time()
    train_sentencepiece(corpus, 1000, tmp_path / "u.model")
    train_byte_bpe(corpus, 2000, tmp_path / "bb")
    assert time.time() - t0 < 10
