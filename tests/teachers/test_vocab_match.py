"""Teacher -> pivot vocabulary matching by surface text: the boundary-marker and byte conventions
(``▁``, byte-level ``Ġ``/``Ċ``, ``<0x0A>`` byte fallback, specials), on tokenizers trained here
(SentencePiece unigram with byte fallback, byte-level BPE), the checked cache and the matched
top-K mass.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/teachers/test_vocab_match.py
"""

from __future__ import annotations

import pytest
import torch

from megatron_fusion.teachers.vocab_match import (VocabMatch, VocabMatchError,
                                                  matched_mass_fraction, surface)
from megatron_fusion.tokenizers import train_byte_bpe, train_sentencepiece

CORPUS = [
    "the cat sat on the mat\nthe dog ate the food\n" * 20,
    "café naïve résumé — the end\n\tindented line with the tab\n" * 20,
    "def f(x):\n    return x + 1  # the function\n" * 20,
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("vm")
    return {
        "sp": train_sentencepiece(CORPUS, 300, d / "sp.model", model_type="unigram"),
        "bpe": train_byte_bpe(CORPUS, 400, d / "bpe"),
        "bpe2": train_byte_bpe(CORPUS[:2], 350, d / "bpe2"),
    }


def _id(tok, piece):
    pieces = [p for p, _ in tok.vocab_pieces()]
    assert piece in pieces, f"{piece!r} not in the vocab of {tok.name}"
    return pieces.index(piece)


def test_surface_rules():
    assert surface("\u2581the", "text") == b" the"
    assert surface("\u0120the", "byte_level") == b" the"            # Ġthe
    assert surface("\u010a", "byte_level") == b"\n"                 # Ċ
    assert surface("\u0109", "byte_level") == b"\t"                 # ĉ
    assert surface("<0x0A>", "byte") == b"\n"
    assert surface("\u00c3\u00a9", "byte_level") == "é".encode()    # Ã© = the two bytes of é
    assert surface("é", "text") == "é".encode()
    assert surface("<|im_end|>", "special") is None
    with pytest.raises(ValueError, match="kind"):
        surface("x", "weird")


def test_vocab_pieces_kinds(toks):
    sp_kinds = dict(toks["sp"].vocab_pieces())
    assert sp_kinds["<0x0A>"] == "byte" and sp_kinds["<s>"] == "special"
    assert sp_kinds["<unk>"] == "special" and sp_kinds["\u2581function"] == "text"
    bpe_kinds = dict(toks["bpe"].vocab_pieces())
    assert bpe_kinds["<|im_end|>"] == "special" and bpe_kinds["\u0120function"] == "byte_level"


def test_sentencepiece_to_byte_level(toks):
    sp, bpe = toks["sp"], toks["bpe"]
    m = VocabMatch.build(sp, bpe)
    d = m.dense()
    # word-boundary markers: ▁function <-> Ġfunction
    assert d[_id(sp, "\u2581function")] == _id(bpe, "\u0120function")
    # byte fallback <0x0A> <-> byte-level Ċ (newline: SP has no "\n" text piece)
    assert d[_id(sp, "<0x0A>")] == _id(bpe, "\u010a")
    # SP has the tab both as a text piece and as <0x09>: the text piece takes ĉ (one-to-one)
    assert d[_id(sp, "\t")] == _id(bpe, "\u0109") and d[_id(sp, "<0x09>")] == -1
    # a multi-byte character: é (one SP piece) <-> Ã© (byte-level) when both have it
    bpe_pieces = dict((p, i) for i, (p, _) in enumerate(bpe.vocab_pieces()))
    sp_pieces = dict((p, i) for i, (p, _) in enumerate(sp.vocab_pieces()))
    assert d[sp_pieces["é"]] == bpe_pieces["\u00c3\u00a9"]
    # specials of different names never match; nothing maps onto a special by surface
    assert d[_id(sp, "<s>")] == -1 and d[_id(sp, "</s>")] == -1 and d[_id(sp, "<unk>")] == -1
    bpe_special = {i for i, (_, k) in enumerate(bpe.vocab_pieces()) if k == "special"}
    assert not set(m.pivot_ids.tolist()) & bpe_special
    # every pair has equal surfaces and the map is one-to-one
    sp_v, bpe_v = sp.vocab_pieces(), bpe.vocab_pieces()
    for t, p in zip(m.teacher_ids.tolist(), m.pivot_ids.tolist()):
        assert surface(*sp_v[t]) == surface(*bpe_v[p]) is not None
    assert len(set(m.pivot_ids.tolist())) == m.n_matched
    assert 0.3 < m.matched_fraction < 1.0
    # and the reverse direction pairs the same tokens
    r = VocabMatch.build(bpe, sp)
    assert sorted(zip(r.pivot_ids.tolist(), r.teacher_ids.tolist())) == \
        sorted(zip(m.teacher_ids.tolist(), m.pivot_ids.tolist()))


def test_text_piece_wins_over_byte_fallback_duplicate():
    """Two SP ids with one surface (a text piece "\\n" and <0x0A>): the text piece is the match,
    the byte piece stays unmatched (one-to-one)."""
    class Fake:
        def __init__(self, pieces, h):
            self.pieces, self.content_hash, self.vocab_size = pieces, h, len(pieces)

        def vocab_pieces(self):
            return self.pieces

    teacher = Fake([("<0x0A>", "byte"), ("\n", "text"), ("<|x|>", "special"), ("a", "text")], "t")
    pivot = Fake([("a", "byte_level"), ("\u010a", "byte_level"), ("<|x|>", "special"),
                  ("<|y|>", "special")], "p")
    m = VocabMatch.build(teacher, pivot)
    assert m.dense().tolist() == [-1, 1, 2, 0]


def test_identical_tokenizers_match_everything(toks):
    bpe = toks["bpe"]
    m = VocabMatch.build(bpe, bpe)
    assert m.n_matched == bpe.vocab_size
    assert torch.equal(m.dense(), torch.arange(bpe.vocab_size))
    # identical specials of two different tokenizers match each other
    other = toks["bpe2"]
    d = VocabMatch.build(bpe, other).dense()
    for sp in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert d[_id(bpe, sp)] == _id(other, sp)


def test_cache_roundtrip_and_checks(toks, tmp_path):
    sp, bpe, bpe2 = toks["sp"], toks["bpe"], toks["bpe2"]
    path = tmp_path / "sp_to_bpe.vmap"
    m = VocabMatch.load_or_build(path, sp, bpe)
    assert path.exists()
    again = VocabMatch.load_or_build(path, sp, bpe)
    assert torch.equal(again.teacher_ids, m.teacher_ids)
    assert torch.equal(again.pivot_ids, m.pivot_ids)
    assert again.matched_fraction == m.matched_fraction
    with pytest.raises(VocabMatchError, match=r"sp_to_bpe\.vmap: header field "
                                              r"'pivot_tokenizer_hash' is"):
        VocabMatch.load(path, sp, bpe2)
    with pytest.raises(VocabMatchError, match="'teacher_tokenizer_hash'"):
        VocabMatch.load_or_build(path, bpe2, bpe)
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 1
    bad = tmp_path / "bad.vmap"
    bad.write_bytes(bytes(raw))
    with pytest.raises(VocabMatchError, match=r"bad\.vmap: checksum mismatch"):
        VocabMatch.load(bad)
    with pytest.raises(VocabMatchError, match="not a vocabulary-match file"):
        (tmp_path / "x.vmap").write_bytes(b"x" * 64)
        VocabMatch.load(tmp_path / "x.vmap")
    with pytest.raises(VocabMatchError, match="file not found"):
        VocabMatch.load(tmp_path / "missing.vmap")


def test_matched_mass_fraction(toks):
    class Fake:
        def __init__(self, pieces, h):
            self.pieces, self.content_hash, self.vocab_size = pieces, h, len(pieces)

        def vocab_pieces(self):
            return self.pieces

    teacher = Fake([("a", "text"), ("b", "text"), ("c", "text"), ("d", "text")], "t")
    pivot = Fake([("b", "text"), ("d", "text")], "p")
    m = VocabMatch.build(teacher, pivot)                  # 1 -> 0, 3 -> 1
    ids = torch.tensor([[[1, 0, 3], [2, 0, 1]]])
    probs = torch.tensor([[[0.5, 0.2, 0.1], [0.6, 0.2, 0.1]]])
    assert matched_mass_fraction(probs, ids, m) == pytest.approx((0.6 + 0.1) / 1.7)
    mask = torch.tensor([[1, 0]])
    assert matched_mass_fraction(probs, ids, m, mask) == pytest.approx(0.6 / 0.8)
    assert matched_mass_fraction(probs, ids, m, torch.zeros(1, 2)) == 0.0
    assert m.matched_fraction == 0.5


def test_real_sentencepiece_to_trained_byte_level(toks):
    """Mistral v1 (real SentencePiece, 32,000) as the teacher of the byte-level BPE trained here."""
    mistral_common = pytest.importorskip("mistral_common",
                                         reason="mistral-common ships the real SP v1 model")
    import os

    from megatron_fusion.tokenizers import load_tokenizer

    sp = load_tokenizer(os.path.join(os.path.dirname(mistral_common.__file__), "data",
                                     "tokenizer.model.v1"))
    bpe = toks["bpe"]
    d = VocabMatch.build(sp, bpe).dense()
    assert d[_id(sp, "\u2581function")] == _id(bpe, "\u0120function")
    assert d[_id(sp, "<0x0A>")] == _id(bpe, "\u010a")
    assert d[_id(sp, "<s>")] == -1 and d[_id(sp, "</s>")] == -1
