"""Teacher -> pivot vocabulary matching by surface text (docs/methods.md §9).

Each token's *surface* is the byte string it stands for, after undoing its tokenizer's
conventions (``Tokenizer.vocab_pieces`` says which applies to each id):

- ``text`` pieces (SentencePiece and HF Metaspace models): ``▁`` -> a space, then UTF-8;
- ``byte_level`` pieces (GPT-2 style byte-level BPE): every character maps back to its byte
  through the GPT-2 byte-to-unicode table (``Ġ`` -> space, ``Ċ`` -> newline, ...);
- ``byte`` pieces (SentencePiece byte fallback ``<0x0A>``): the one byte;
- ``special`` tokens: never matched by surface; a special matches only a special of the
  other tokenizer with the identical piece string (``<|im_end|>`` == ``<|im_end|>``).

Two tokens match when their surfaces are equal. The map is one-to-one: when several ids of one
tokenizer share a surface (e.g. a ``text`` piece and a ``byte`` piece for the same byte), the
``text``/``byte_level`` one wins over the ``byte`` one, then the lowest id; the others stay
unmatched. Empty surfaces never match.

Built once from the two tokenizers and cached in a checked file (``load_or_build``)::

    magic "MFVMAP\\r\\n" | version u32 | header_len u32 | header JSON
    | payload: n x (teacher id i32, pivot id i32) | sha256 of everything before it

The header carries both tokenizers' ``content_hash`` and vocab sizes; ``load`` checks them
against the tokenizers of the run: a mismatch is one line naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_fusion.errors import UserError
from megatron_fusion.teachers.align import bytelevel_decoder
from megatron_fusion.teachers.shards import atomic_write_bytes

MAGIC = b"MFVMAP\r\n"
VERSION = 1
_PRE = struct.Struct("<8sII")
_PREFERENCE = {"text": 0, "byte_level": 0, "byte": 1}


class VocabMatchError(UserError, ValueError):
    """A vocabulary-match cache that cannot be used: the message names the file (and field)."""


def surface(piece: str, kind: str) -> bytes | None:
    """The bytes a vocabulary piece stands for (None: never matched by surface)."""
    if kind == "special":
        return None
    if kind == "byte":
        return bytes([int(piece[3:5], 16)])
    if kind == "byte_level":
        table = bytelevel_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")      # an added non-special token, stored as plain text
    if kind == "text":
        return piece.replace("\u2581", " ").encode("utf-8")
    raise ValueError(f"surface: unknown piece kind {kind!r}")


def _index(pieces: list[tuple[str, str]]) -> tuple[dict, dict]:
    """-> ({surface: id} with the preferred id per surface, {special piece: id})."""
    by_surface: dict[bytes, tuple[int, int]] = {}
    specials: dict[str, int] = {}
    for i, (piece, kind) in enumerate(pieces):
        if kind == "special":
            specials.setdefault(piece, i)
            continue
        sf = surface(piece, kind)
        if not sf:
            continue
        key = (_PREFERENCE[kind], i)
        if sf not in by_surface or key < by_surface[sf]:
            by_surface[sf] = key
    return {sf: i for sf, (_, i) in by_surface.items()}, specials


@dataclass(frozen=True)
class VocabMatch:
    """A one-to-one sparse map teacher id -> pivot id (sorted by teacher id)."""

    teacher_ids: torch.Tensor       # [n] int64, ascending
    pivot_ids: torch.Tensor         # [n] int64
    teacher_vocab_size: int
    pivot_vocab_size: int
    teacher_hash: str
    pivot_hash: str

    @property
    def n_matched(self) -> int:
        return int(self.teacher_ids.numel())

    @property
    def matched_fraction(self) -> float:
        """Matched teacher tokens / teacher vocab size (GOLD's adaptive matched weight)."""
        return self.n_matched / max(1, self.teacher_vocab_size)

    def dense(self, device=None) -> torch.Tensor:
        """[teacher_vocab_size] int64: pivot id or -1."""
        out = torch.full((self.teacher_vocab_size,), -1, dtype=torch.long, device=device)
        out[self.teacher_ids.to(device)] = self.pivot_ids.to(device)
        return out

    def map_ids(self, teacher_ids: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher ids (any shape) -> pivot ids, -1 where unmatched (on the ids' device)."""
        table = self.dense(teacher_ids.device) if dense is None else dense
        return table[teacher_ids.long()]

    # ------------------------------------------------------------ build / cache
    @classmethod
    def build(cls, teacher, pivot) -> "VocabMatch":
        """From two tokenizers with ``vocab_pieces()`` (megatron_fusion.tokenizers)."""
        t_pieces, p_pieces = teacher.vocab_pieces(), pivot.vocab_pieces()
        p_surface, p_special = _index(p_pieces)
        t_surface, t_special = _index(t_pieces)
        pairs = {t: p_surface[sf] for sf, t in t_surface.items() if sf in p_surface}
        pairs.update({t: p_special[pc] for pc, t in t_special.items() if pc in p_special})
        t_ids = sorted(pairs)
        return cls(torch.tensor(t_ids, dtype=torch.long),
                   torch.tensor([pairs[t] for t in t_ids], dtype=torch.long),
                   len(t_pieces), len(p_pieces), teacher.content_hash, pivot.content_hash)

    def _header(self) -> dict:
        return {"teacher_tokenizer_hash": self.teacher_hash,
                "pivot_tokenizer_hash": self.pivot_hash,
                "teacher_vocab_size": self.teacher_vocab_size,
                "pivot_vocab_size": self.pivot_vocab_size, "n_matched": self.n_matched}

    def save(self, path) -> None:
        payload = np.stack([self.teacher_ids.numpy(), self.pivot_ids.numpy()], 1) \
            .astype("<i4").tobytes()
        hb = json.dumps(dict(self._header(), payload_bytes=len(payload)), sort_keys=True).encode()
        pre = _PRE.pack(MAGIC, VERSION, len(hb))
        digest = hashlib.sha256(pre + hb + payload).digest()
        atomic_write_bytes(path, [pre, hb, payload, digest])

    @classmethod
    def load(cls, path, teacher=None, pivot=None) -> "VocabMatch":
        """Read and check a cache; with the run's tokenizers, also their hashes and sizes."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise VocabMatchError(f"{path}: file not found") from None
        if len(raw) < _PRE.size + 32:
            raise VocabMatchError(f"{path}: truncated ({len(raw)} bytes)")
        magic, version, hlen = _PRE.unpack(raw[:_PRE.size])
        if magic != MAGIC:
            raise VocabMatchError(f"{path}: not a vocabulary-match file (magic {magic!r})")
        if version != VERSION:
            raise VocabMatchError(f"{path}: format version {version}, this reader reads {VERSION}")
        if hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
            raise VocabMatchError(f"{path}: checksum mismatch (file corrupted or truncated)")
        header = json.loads(raw[_PRE.size:_PRE.size + hlen])
        payload = raw[_PRE.size + hlen:-32]
        if len(payload) != header["payload_bytes"] or len(payload) != 8 * header["n_matched"]:
            raise VocabMatchError(f"{path}: payload size {len(payload)} does not match the header")
        for side, tok in (("teacher", teacher), ("pivot", pivot)):
            if tok is None:
                continue
            for field, want in ((f"{side}_tokenizer_hash", tok.content_hash),
                                (f"{side}_vocab_size", tok.vocab_size)):
                if header[field] != want:
                    raise VocabMatchError(f"{path}: header field {field!r} is {header[field]!r}, "
                                          f"the {side} tokenizer of this run has {want!r}")
        arr = torch.from_numpy(np.frombuffer(payload, dtype="<i4").reshape(-1, 2).astype(np.int64))
        return cls(arr[:, 0].clone(), arr[:, 1].clone(), header["teacher_vocab_size"],
                   header["pivot_vocab_size"], header["teacher_tokenizer_hash"],
                   header["pivot_tokenizer_hash"])

    @classmethod
    def load_or_build(cls, path, teacher, pivot) -> "VocabMatch":
        """The cache at ``path`` if present (checked against both tokenizers), else build and
        write it. A cache made for other tokenizers is an error, not silently rebuilt."""
        if Path(path).exists():
            return cls.load(path, teacher, pivot)
        match = cls.build(teacher, pivot)
        match.save(path)
        return match


def matched_mass_fraction(probs: torch.Tensor, teacher_ids: torch.Tensor, match: VocabMatch,
                          mask: torch.Tensor | None = None) -> float:
    """Fraction of the teacher's top-K probability mass on matched tokens over a batch.

    probs, teacher_ids: ``[..., K]`` the teacher's top-K probabilities and ids; mask ``[...]``
    (1 = count this position). Returns sum(p on matched) / sum(p), 0.0 for an empty batch.
    """
    matched = match.map_ids(teacher_ids) >= 0
    p = probs.double()
    if mask is not None:
        p = torch.where((mask > 0)[..., None], p, 0.0)
    total = float(p.sum())
    return float(torch.where(matched, p, 0.0).sum()) / total if total > 0 else 0.0
