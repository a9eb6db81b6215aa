"""Token alignment between the pivot's and a teacher's tokenizations of the same text (docs/methods.md §1).

Both functions return, for every pivot position i, the aligned teacher position j, or -1.
Positions are aligned when they are *context-equivalent*: token i of the pivot and token j of the
teacher end at the same place in the text, so the logits at i and at j both predict what follows
that same prefix (and the teacher's top-K at j can stand in for the pivot's at i).

- ``offset_alignment(pivot_offsets, teacher_offsets)`` (default, exact): by character spans.
  Tokens are grouped by span end; the last token of a group (the one after which the text is
  complete up to that character) aligns with the other side's last token ending there. Pieces of
  a character split into several byte pieces align only rank-for-rank when both sides split it
  into the same number of pieces. Zero-width tokens (BOS, EOS and other specials the data
  pipeline adds) align with the k-th zero-width token at the same place on the other side.
- ``mined_alignment(pivot_tokens, teacher_tokens)`` (FuseLLM, hard mode): dynamic-programming
  alignment (DTW) minimising the summed edit distance (``editdistance``) between normalised token
  strings; a pivot token aligns only where the path matches it to exactly one teacher token,
  that teacher token to it alone, and the two normalised strings are equal. Normalisation maps
  SentencePiece ``▁`` and byte-level ``Ġ``/``Ċ``... and ``<0xNN>`` byte pieces back to their bytes,
  then drops one leading space (the word-boundary marker). The DP runs in a band around the path
  predicted by the cumulative string lengths (``band`` tokens each side), one vectorised numpy
  min-plus scan per row: O(n·band), ~0.2 s for 4k x 4k tokens (tools/bench_align.py).

- ``next_aligned(alignment)`` (``offset_next``): keeps position i only where pivot position i + 1
  aligns with teacher position j + 1 too. Then both sides' next tokens start and end at the same
  characters, so they are the same piece of text and the teacher's distribution at j is over the
  same next-token event as the pivot's label at i. Where the tokenizers cut the continuation
  differently, plain alignment gives the pivot a teacher distribution over the teacher's next
  piece, which is not the pivot's next token (the fusion experiment's segmentation check,
  docs/experiments.md, measures how often).

``aligned_fraction(alignment, mask)`` and ``report_alignment(name, fraction, threshold)`` report
coverage per teacher and warn under the threshold (default 0.8).
"""

from __future__ import annotations

import logging
import re
import warnings
from functools import lru_cache
from typing import Sequence

import editdistance
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.8


# ------------------------------------------------------------------------------------------------
# Offset alignment
# ------------------------------------------------------------------------------------------------

def _context_keys(offsets: Sequence[Sequence[int]]) -> list:
    """One hashable key per token naming the text context that ends with it (None: none useful)."""
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n = len(offs)
    keys: list = [None] * n
    zero_seen: dict[int, int] = {}
    i = 0
    while i < n:
        s, e = offs[i]
        if e <= s:  # zero-width: a special token, keyed by its place and rank there
            k = zero_seen.get(int(e), 0)
            zero_seen[int(e)] = k + 1
            keys[i] = ("s", int(e), k)
            i += 1
            continue
        # a run of non-zero-width tokens with the same end (pieces of one character)
        j = i
        while j + 1 < n and offs[j + 1][1] == e and offs[j + 1][1] > offs[j + 1][0]:
            j += 1
        m = j - i + 1
        for r in range(m - 1):
            keys[i + r] = ("p", int(e), r, m)
        keys[j] = ("t", int(e))
        i = j + 1
    return keys


def offset_alignment(pivot_offsets: Sequence[Sequence[int]],
                     teacher_offsets: Sequence[Sequence[int]]) -> list[int]:
    """Pivot position -> teacher position with the same context end (character span), else -1."""
    where = {k: j for j, k in enumerate(_context_keys(teacher_offsets)) if k is not None}
    out, last = [], -1
    for k in _context_keys(pivot_offsets):
        j = where.get(k, -1) if k is not None else -1
        if j <= last:  # keep the alignment strictly monotonic (never expected to trigger)
            j = -1
        else:
            last = j
        out.append(j)
    return out


def next_aligned(alignment: Sequence[int]) -> list[int]:
    """An alignment restricted to positions whose NEXT positions align too (i -> j kept only if
    i + 1 -> j + 1): both sides then predict the same next piece of text. The last position
    (whose next is not in the map) is dropped."""
    a = list(alignment)
    return [j if j >= 0 and i + 1 < len(a) and a[i + 1] == j + 1 else -1 for i, j in enumerate(a)]


# ------------------------------------------------------------------------------------------------
# Mined (FuseLLM) alignment
# ------------------------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def bytelevel_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted (char -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _style(pieces: Sequence[str]) -> str:
    """'sp' (▁ / <0xNN>), 'bytelevel' (Ġ, Ċ...), or 'plain'."""
    if any("▁" in p or _BYTE_PIECE.match(p) for p in pieces):
        return "sp"
    if any(("Ġ" in p or "Ċ" in p or "ĉ" in p) for p in pieces):
        return "bytelevel"
    return "plain"


def normalize_piece(piece: str, style: str) -> str:
    """A token string as the bytes it stands for (latin-1 text), without its boundary marker."""
    if style == "sp":
        m = _BYTE_PIECE.match(piece)
        raw = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")
    elif style == "bytelevel":
        table = bytelevel_decoder()
        raw = bytes(table.get(c, ord("?") if ord(c) > 255 else ord(c)) for c in piece)
    else:
        raw = piece.encode("utf-8")
    s = raw.decode("latin-1")  # one char per byte: edit distance counts bytes, pieces stay exact
    return s[1:] if s.startswith(" ") else s


def _band_centres(p_len: np.ndarray, t_len: np.ndarray) -> np.ndarray:
    """For each pivot token, the teacher token whose cumulative text length is nearest."""
    cp = np.cumsum(np.maximum(p_len, 1)).astype(np.float64)
    ct = np.cumsum(np.maximum(t_len, 1)).astype(np.float64)
    cp *= ct[-1] / cp[-1]  # normalisation may change lengths unevenly: stretch to the same total
    return np.clip(np.searchsorted(ct, cp, side="left"), 0, len(t_len) - 1)


def mined_alignment(pivot_tokens: Sequence[str], teacher_tokens: Sequence[str], *,
                    band: int = 64, pivot_style: str | None = None,
                    teacher_style: str | None = None, tie_break: float = 1e-3) -> list[int]:
    """FuseLLM hard alignment of token strings (see the module docstring); -1 where unaligned.

    ``band``: half-width (teacher tokens) of the DP band around the length-predicted path;
    widen it for texts where the two sides' normalised lengths drift apart locally.
    ``tie_break``: weight of a vanishing penalty (summed over the whole path it stays below 0.5,
    less than any edit) on the text-position gap, used only to choose among equal-cost paths;
    0 gives plain FuseLLM DTW.
    """
    n, m = len(pivot_tokens), len(teacher_tokens)
    if n == 0 or m == 0:
        return [-1] * n
    ps, ts = pivot_style or _style(pivot_tokens), teacher_style or _style(teacher_tokens)
    p_norm = [normalize_piece(p, ps) for p in pivot_tokens]
    t_norm = [normalize_piece(t, ts) for t in teacher_tokens]

    # band: row i covers teacher columns [lo[i], hi[i]) (both non-decreasing, row 0 from 0,
    # last row to m), so every monotone path inside the band is representable
    centre = _band_centres(np.array([len(s) for s in p_norm]), np.array([len(s) for s in t_norm]))
    lo = np.maximum.accumulate(np.clip(centre - band, 0, m - 1))
    hi = np.maximum.accumulate(np.clip(centre + band + 1, 1, m))
    lo[0], hi[-1] = 0, m
    hi = np.maximum(hi, lo + 1)
    lo = np.minimum(lo, np.r_[0, hi[:-1]])  # row i starts no later than row i-1 ends: connected
    width = int((hi - lo).max())

    # edit-distance cost of every in-band pair, computed once per distinct string pair
    p_uid, p_inv = np.unique(np.array(p_norm, dtype=object), return_inverse=True)
    t_uid, t_inv = np.unique(np.array(t_norm, dtype=object), return_inverse=True)
    cols = lo[:, None] + np.arange(width)[None, :]                     # [n, w]
    valid = cols < hi[:, None]
    colc = np.minimum(cols, m - 1)
    pair = p_inv[:, None].astype(np.int64) * len(t_uid) + t_inv[colc]   # [n, w]
    uniq, inv = np.unique(pair[valid], return_inverse=True)
    ucost = np.fromiter((editdistance.eval(p_uid[u // len(t_uid)], t_uid[u % len(t_uid)])
                         for u in uniq.tolist()), dtype=np.float64, count=len(uniq))
    cost = np.full((n, width), np.inf)
    cost[valid] = ucost[inv]
    if tie_break:
        # runs of identical tokens ("the the the") make many paths equally cheap, and a path
        # shifted by one inside the run passes the hard 1:1 + equal-string test while pairing the
        # wrong tokens; a tiny penalty on the gap between the two cumulative (normalised) text
        # positions picks the in-step path among equal-cost ones
        p_end = np.cumsum([len(s) for s in p_norm])
        t_end = np.cumsum([len(s) for s in t_norm])
        gap = np.abs(p_end[:, None] - t_end[colc]).astype(np.float64)
        cost[valid] += tie_break * np.minimum(gap[valid], 1.0 / tie_break * 0.5) / (1 + n + m)

    # DTW: D[i,j] = C[i,j] + min(D[i-1,j-1], D[i-1,j], D[i,j-1]); the in-row term is a min-plus
    # scan: D[i,j] = S[j] + min_{k<=j}(A[k] - S[k-1]) with S = cumsum(C[i]), A = best from row i-1
    D = np.full((n, width), np.inf)
    S = np.cumsum(cost[0])
    D[0] = S  # row 0: only moves right from (0, 0)
    for i in range(1, n):
        prev = D[i - 1]
        j = cols[i]
        up = np.full(width, np.inf)      # D[i-1, j]
        diag = np.full(width, np.inf)    # D[i-1, j-1]
        k = j - lo[i - 1]
        ok = (k >= 0) & (k < width)
        up[ok] = prev[k[ok]]
        ok1 = (k - 1 >= 0) & (k - 1 < width)
        diag[ok1] = prev[k[ok1] - 1]
        A = np.minimum(up, diag)
        c = cost[i]
        S = np.cumsum(np.where(np.isfinite(c), c, 0.0))
        S_prev = np.r_[0.0, S[:-1]]
        row = S + np.minimum.accumulate(A - S_prev)
        row[~valid[i]] = np.inf
        D[i] = row

    # trace back from (n-1, m-1); ties prefer the diagonal, then up, then left
    path_i, path_j = [], []
    i, j = n - 1, m - 1
    while True:
        path_i.append(i)
        path_j.append(j)
        if i == 0 and j == 0:
            break
        best, step = np.inf, None
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            a, b = i - di, j - dj
            if a < 0 or b < 0 or not (lo[a] <= b < hi[a]):
                continue
            v = D[a, b - lo[a]]
            if v < best:
                best, step = v, (a, b)
        if step is None:  # cannot happen with a connected band; fail loudly rather than guess
            raise RuntimeError("mined_alignment: DP band is disconnected")
        i, j = step
    path_i, path_j = np.array(path_i[::-1]), np.array(path_j[::-1])

    # hard mode: 1:1 on the path and equal normalised strings
    ni = np.bincount(path_i, minlength=n)
    nj = np.bincount(path_j, minlength=m)
    out = [-1] * n
    for a, b in zip(path_i.tolist(), path_j.tolist()):
        if ni[a] == 1 and nj[b] == 1 and p_norm[a] == t_norm[b]:
            out[a] = b
    return out


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------

def aligned_fraction(alignment: Sequence[int], mask: Sequence[bool] | None = None) -> float:
    """Fraction of (masked, e.g. response) pivot positions with an aligned teacher position."""
    a = np.asarray(alignment)
    sel = np.ones(len(a), bool) if mask is None else np.asarray(mask, bool)[: len(a)]
    total = int(sel.sum())
    return float((a[sel] >= 0).sum() / total) if total else 1.0


def report_alignment(teacher: str, fraction: float, threshold: float = DEFAULT_THRESHOLD) -> None:
    """Log the aligned fraction; warn (``UserWarning``) under ``threshold``."""
    log.info("alignment/%s: %.4f of pivot response positions aligned", teacher, fraction)
    if fraction < threshold:
        warnings.warn(f"teacher {teacher!r}: only {fraction:.1%} of pivot response positions "
                      f"aligned (threshold {threshold:.0%}); its distillation terms cover the rest "
                      "with mask 0", stacklevel=2)
