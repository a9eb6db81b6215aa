"""Teacher top-K shards and source log-prob files on disk (docs/methods.md §6), written atomically, checked.

Teacher top-K, per sample at *pivot* positions (already aligned): ``values [s, K]`` (standardised
logits ``a_t`` of methods.md §2), ``ids [s, K]`` (teacher vocab), ``aligned_mask [s]``, and in
format 4 the teacher's log-probs at those ids over its full vocabulary, ``logp [s, K]``.

    with TopKWriter(path, TopKHeader(teacher="t0", ..., dtype="logp16")) as w:
        w.add(sample_id, values, ids, aligned_mask, logprobs=(logp, d, c))  # mask-0 rows dropped
    reader = TopKReader(dir_or_paths, expected={"k": 10, "dataset_hash": ds.dataset_hash, ...})
    values, ids, aligned_mask = reader.get(sample_id, seq_len=s)   # [s,K] f32, [s,K] i64, [s] bool
    values, ids, aligned_mask, logp = reader.get(sample_id, seq_len=s, logprobs=True)
    ce = reader.teacher_ce_byte(sample_ids)                        # [b] f32 (minCE / avgCE)

File layout (little-endian)::

    magic (8 B) | version u32 | header_len u32 | header (JSON, utf-8)
    | index: n x (sample_id i64, offset i64, n_positions i32, n_rows i32,
    |             teacher_ce f32, teacher_ce_tokens i32,
    |             teacher_ce_byte f32, teacher_ce_bytes i32)              offsets into the data
    | data: per sample, format 3 (dtype bfloat16 / float16):
    |         ids i32 [n_rows, K] | values fp16/bf16 [n_rows, K] | aligned bits [ceil(n/8)]
    |       format 4 (dtype logp16):
    |         ids i32 [n_rows, K] | d f32 [n_rows] | c f32 [n_rows] | log-prob codes u16 [n_rows, K]
    |         | aligned bits [ceil(n/8)]
    |       (each sample padded to 8 bytes)
    | sha256 of everything before it (32 B)

Only aligned rows are stored. Format 3: K ids (4 B) + K values (2 B) = 60 B per aligned position
at K = 10; format 4: K ids + ``d = sigma + eps`` and ``c = mu - logsumexp`` (fp32) + K log-prob
codes ``q = round(-log p * 2^10)`` (uint16, log p in [-63.999, 0], rounding error <= 2^-11 =
4.9e-4 nats, lower log-probs clamped and counted in ``meta.logp_clamped``) = 68 B; both plus one
bit per pivot position. A format-4 reader gives ``log p = -q * 2^-10`` and the values ULD / GLD
read as ``(log p - c) / d`` (``teachers.logprobs``, methods.md §6). Values-only shards are still
written as format 3 (the same bytes as before) and read as before. Per sample the index also holds the teacher's cross-entropy on
the gold response: its summed NLL over its *own* response tokens divided by those tokens
(``teacher_ce``, nats/token, over ``teacher_ce_tokens``) and divided by the UTF-8 bytes of
response text those tokens cover (``teacher_ce_byte``, nats/byte, over ``teacher_ce_bytes``).
The minCE / avgCE teacher weights of methods.md §2 compare ``teacher_ce_byte``: the same text
costs every tokenizer the same bytes, not the same tokens. Both are NaN when the teacher saw no
response token (count 0). The header carries the teacher name, both tokenizer hashes, K,
dataset hash, the sample-id range, dtype and a free ``meta`` dict (alignment, eps, aligned and
response positions); the trailer checksum covers header and payload. ``TopKReader`` checks every
file's magic, version, size and header fields against ``expected`` when opened (before step 1)
and its sha256 once per process, when a sample of that shard is first read (``get`` / ``batch``
/ the CE fields), before any of its bytes is used: a wrong magic/version, a truncated file, a
bad checksum or a header field that differs from ``expected`` raises ``TopKStoreError`` naming
the file (and the field).

``SourceLogprobStore``: per preference pair and source model, the summed log-prob and token count
of the chosen and of the rejected response (docs/methods.md §5), in the same checked container.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from megatron_fusion.errors import UserError

VERSION = 4                             # top-K shard format (2: per-sample teacher_ce in the index,
                                        # 3: + teacher_ce_byte / teacher_ce_bytes,
                                        # 4: + teacher log-probs: dtype "logp16", see below)
READ_VERSIONS = (3, 4)                  # top-K formats this reader reads (3: values only)
LOGP_DTYPE = "logp16"                   # format 4: log-probs (uint16 fixed point) + d, c (fp32)
LOGPROB_VERSION = 1                     # source log-prob files
TOPK_MAGIC = b"MFTOPK\r\n"
LOGPROB_MAGIC = b"MFSLPB\r\n"
_VERSIONS = {TOPK_MAGIC: VERSION, LOGPROB_MAGIC: LOGPROB_VERSION}
_READABLE = {TOPK_MAGIC: READ_VERSIONS, LOGPROB_MAGIC: (LOGPROB_VERSION,)}
_PRE = struct.Struct("<8sII")           # magic, version, header_len
_INDEX = np.dtype([("sample_id", "<i8"), ("offset", "<i8"), ("n_positions", "<i4"),
                   ("n_rows", "<i4"), ("teacher_ce", "<f4"), ("teacher_ce_tokens", "<i4"),
                   ("teacher_ce_byte", "<f4"), ("teacher_ce_bytes", "<i4")])
_LOGPROB = np.dtype([("sample_id", "<i8"), ("chosen_logprob", "<f8"), ("chosen_tokens", "<i8"),
                     ("rejected_logprob", "<f8"), ("rejected_tokens", "<i8")])
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}   # format 3: stored values
_TOPK_DTYPES = (*_DTYPES, LOGP_DTYPE)
# why an older top-K shard cannot be read (its fields cannot be converted without the text)
_OLD_TOPK = {1: "no teacher CE in its index",
             2: "its teacher CE is per teacher token; minCE / avgCE compare per byte of text"}


class TopKStoreError(UserError, ValueError):
    """A shard that cannot be used: message names the file (and the header field)."""


# ------------------------------------------------------------------------------------------------
# Container: magic | version | header | payload | sha256
# ------------------------------------------------------------------------------------------------

def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files that ``atomic_write_bytes`` left in ``directory`` when its writer was
    killed mid-write (``.<name>.tmp.<pid>`` whose pid is no longer alive); returns them. Readers
    never take a temp for a shard, so this only reclaims disk; a live writer's temp is kept."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for tmp in d.glob(".*.tmp.*"):
        pid = tmp.name.rsplit(".", 1)[-1]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write to a temp file in the same directory, fsync, rename over ``path``, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_container(path, magic: bytes, header: dict, payload: Sequence[bytes],
                     version: int | None = None) -> None:
    header = dict(header, payload_bytes=sum(len(p) for p in payload))
    hb = json.dumps(header, sort_keys=True).encode()
    pre = _PRE.pack(magic, _VERSIONS[magic] if version is None else version, len(hb))
    h = hashlib.sha256(pre)
    h.update(hb)
    for p in payload:
        h.update(p)
    atomic_write_bytes(path, [pre, hb, *payload, h.digest()])


def read_container(path, magic: bytes, verify: bool = True,
                   with_version: bool = False) -> tuple:
    """-> (header, payload as a read-only uint8 memmap) (+ the format version with
    ``with_version``). Raises TopKStoreError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TopKStoreError(f"{path}: file not found") from None
    if size < _PRE.size + 32:
        raise TopKStoreError(f"{path}: truncated ({size} bytes, smaller than any valid file)")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    got_magic, version, hlen = _PRE.unpack(raw[:_PRE.size].tobytes())
    if got_magic != magic:
        raise TopKStoreError(f"{path}: not a {magic[:6].decode()} file (magic {got_magic!r})")
    if version not in _READABLE[magic]:
        why = _OLD_TOPK.get(version, "") if magic == TOPK_MAGIC else ""
        hint = (f" ({why + ': ' if why else ''}re-run the tool that wrote it)"
                if version < _VERSIONS[magic] else "")
        reads = " and ".join(str(v) for v in _READABLE[magic])
        raise TopKStoreError(f"{path}: format version {version}, this reader reads "
                             f"{reads}{hint}")
    if _PRE.size + hlen + 32 > size:
        raise TopKStoreError(f"{path}: truncated inside the header")
    try:
        header = json.loads(raw[_PRE.size:_PRE.size + hlen].tobytes())
        payload_bytes = int(header["payload_bytes"])
    except (ValueError, KeyError, TypeError):
        raise TopKStoreError(f"{path}: corrupt header (checksum would fail)") from None
    start = _PRE.size + hlen
    expected = start + payload_bytes + 32
    if size != expected:
        raise TopKStoreError(f"{path}: truncated or padded: {size} bytes, header says {expected}")
    if verify:
        verify_file_checksum(path, raw)
    if with_version:
        return header, raw[start:start + payload_bytes], version
    return header, raw[start:start + payload_bytes]


def verify_file_checksum(path, raw: np.ndarray | None = None) -> None:
    """sha256 of everything before the trailer == the trailer, else TopKStoreError naming the
    file. The one place a container is hashed (O(file size))."""
    if raw is None:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    size = raw.shape[0]
    h = hashlib.sha256()
    for a in range(0, size - 32, 1 << 24):
        h.update(raw[a:min(a + (1 << 24), size - 32)])
    if h.digest() != raw[size - 32:].tobytes():
        raise TopKStoreError(f"{path}: checksum mismatch (file corrupted)")


def check_expected(path, header: Mapping, expected: Mapping | None) -> None:
    """Every ``expected`` field equals the header's; ``"meta.X"`` names ``header["meta"]["X"]``."""
    for k, v in (expected or {}).items():
        where = (header.get("meta") or {}) if k.startswith("meta.") else header
        key = k[5:] if k.startswith("meta.") else k
        if key not in where:
            raise TopKStoreError(f"{path}: header has no field {k!r} (the run expects {v!r})")
        if where[key] != v:
            raise TopKStoreError(f"{path}: header field {k!r} is {where[key]!r}, "
                                 f"the run expects {v!r}")


# ------------------------------------------------------------------------------------------------
# Teacher top-K
# ------------------------------------------------------------------------------------------------

@dataclass
class TopKHeader:
    """What a teacher top-K shard was made from; the reader checks these against the run."""

    teacher: str                   # teacher name (as in the fusion config)
    teacher_tokenizer_hash: str    # Tokenizer.content_hash of the teacher
    pivot_tokenizer_hash: str      # Tokenizer.content_hash of the pivot
    k: int                         # top-K width
    dataset_hash: str              # SFTDataset.dataset_hash of the pivot data (file+tokenizer+seq_len)
    dtype: str = "bfloat16"        # what is stored per entry: "bfloat16" / "float16" values a_t
                                   # (format 3), or "logp16": the teacher's log-probs (format 4)
    sample_id_start: int = -1      # first sample id in the shard (filled by the writer)
    sample_id_end: int = -1        # last sample id + 1 (filled by the writer)
    n_samples: int = 0             # filled by the writer
    meta: dict = field(default_factory=dict)  # free-form: alignment method, eps, aligned fraction

    def __post_init__(self):
        if self.dtype not in _TOPK_DTYPES:
            raise ValueError(f"TopKHeader.dtype must be one of {sorted(_TOPK_DTYPES)}, got "
                             f"{self.dtype!r}")
        if self.k < 1:
            raise ValueError(f"TopKHeader.k must be >= 1, got {self.k}")


class TopKWriter:
    """Collect samples in memory, write the shard atomically on ``close()`` (or ``with`` exit)."""

    def __init__(self, path: str | os.PathLike, header: TopKHeader):
        self.path, self.header = Path(path), header
        # (sample_id, n_positions, data, rows, teacher_ce, teacher_ce_tokens, teacher_ce_byte,
        #  teacher_ce_bytes)
        self._samples: list[tuple] = []
        self._closed = False
        self.logp_clamped = 0     # log-probs below LOGP_MIN, stored as LOGP_MIN (header meta)

    def add(self, sample_id: int, values: torch.Tensor | None, ids: torch.Tensor,
            aligned_mask: torch.Tensor, teacher_ce: float = float("nan"),
            teacher_ce_tokens: int = 0, teacher_ce_byte: float = float("nan"),
            teacher_ce_bytes: int = 0, *, logprobs: tuple | None = None) -> None:
        """values [s, K] float, ids [s, K] int, aligned_mask [s] bool; rows with mask 0 dropped.

        ``teacher_ce``: the teacher's summed NLL over its ``teacher_ce_tokens`` response tokens
        per token (nats/token); ``teacher_ce_byte``: the same sum per UTF-8 byte of the response
        text those tokens cover (``teacher_ce_bytes``). Stored as float32; NaN = not computed /
        no response token.

        ``logprobs = (logp [s, K], d [s], c [s])``: the teacher's top-K log-probs over its full
        vocabulary and ``d = sigma + eps``, ``c = mu - logsumexp`` (``teachers.logprobs``);
        required by a ``dtype="logp16"`` shard, which stores these instead of ``values`` (read
        back, the values are ``(log p - c) / d``; ``values`` may be None), refused by the others.
        """
        k, s = self.header.k, aligned_mask.shape[0]
        lp = self.header.dtype == LOGP_DTYPE
        if lp != (logprobs is not None):
            raise ValueError(f"{self.path}: sample {sample_id}: a dtype={self.header.dtype!r} shard "
                             + ("needs logprobs=(logp, d, c)" if lp else "stores no log-probs "
                                "(dtype 'logp16' does)"))
        if (not lp and (values is None or values.shape != (s, k))) or ids.shape != (s, k):
            raise ValueError(f"{self.path}: sample {sample_id}: values "
                             f"{None if values is None else tuple(values.shape)} / ids "
                             f"{tuple(ids.shape)} must be [{s}, {k}] (aligned_mask has {s})")
        if lp and (logprobs[0].shape != (s, k) or logprobs[1].shape != (s,)
                   or logprobs[2].shape != (s,)):
            raise ValueError(f"{self.path}: sample {sample_id}: logp / d / c "
                             f"{[tuple(t.shape) for t in logprobs]} must be [{s}, {k}] / [{s}] / "
                             f"[{s}]")
        if self._samples and sample_id <= self._samples[-1][0]:
            raise ValueError(f"{self.path}: sample ids must increase ({sample_id} after "
                             f"{self._samples[-1][0]})")
        mask = aligned_mask.detach().to("cpu", torch.bool)
        i = ids.detach().to("cpu")[mask]
        if i.numel() and (i.min() < 0 or i.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{self.path}: sample {sample_id}: ids out of int32 range")
        if lp:   # ids i32 | d f32 | c f32 | log-prob codes u16 (methods.md §6)
            from megatron_fusion.teachers.logprobs import LOGP_MIN, encode_logprobs

            logp, d, c = (t.detach().to("cpu")[mask] for t in logprobs)
            self.logp_clamped += int((logp < LOGP_MIN).sum())
            body = (d.to(torch.float32).numpy().tobytes() + c.to(torch.float32).numpy().tobytes()
                    + encode_logprobs(logp).numpy().tobytes())
        else:
            v = values.detach().to("cpu")[mask].to(_DTYPES[self.header.dtype]).contiguous()
            body = v.view(torch.int16).numpy().tobytes()
        data = (i.to(torch.int32).numpy().tobytes() + body
                + np.packbits(mask.numpy(), bitorder="little").tobytes())
        data += b"\0" * (-len(data) % 8)
        for name, n in (("teacher_ce_tokens", teacher_ce_tokens),
                        ("teacher_ce_bytes", teacher_ce_bytes)):
            if n < 0 or n > np.iinfo(np.int32).max:
                raise ValueError(f"{self.path}: sample {sample_id}: {name} {n} out of int32 range")
        self._samples.append((int(sample_id), int(s), data, int(mask.sum()), float(teacher_ce),
                              int(teacher_ce_tokens), float(teacher_ce_byte),
                              int(teacher_ce_bytes)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        n = len(self._samples)
        index = np.zeros(n, dtype=_INDEX)
        off = n * _INDEX.itemsize
        for r, (sid, s, data, rows, *ce) in enumerate(self._samples):
            index[r] = (sid, off, s, rows, *ce)
            off += len(data)
        h = self.header
        h.n_samples = n
        h.sample_id_start = self._samples[0][0] if n else -1
        h.sample_id_end = self._samples[-1][0] + 1 if n else -1
        # format 4 only where it differs: values-only shards stay format 3 (the same bytes)
        lp = h.dtype == LOGP_DTYPE
        if lp:
            h.meta = dict(h.meta, logp_clamped=self.logp_clamped)
        _write_container(self.path, TOPK_MAGIC, asdict(h),
                         [index.tobytes()] + [smp[2] for smp in self._samples],
                         version=VERSION if lp else 3)

    def abort(self) -> None:
        """Drop what was added; nothing is written."""
        self._closed = True
        self._samples.clear()

    def __enter__(self) -> "TopKWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_topk_header(path: str | os.PathLike, expected: Mapping | None = None,
                     verify: bool = True) -> dict:
    """Validate one shard (magic, size, checksum, ``expected`` fields) and return its header."""
    header, _ = read_container(path, TOPK_MAGIC, verify)
    check_expected(path, header, expected)
    return header


class TopKReader:
    """Random access by sample id over one or more shards.

    ``expected``: header fields the run requires (e.g. ``teacher``, ``k``, ``dataset_hash``,
    ``teacher_tokenizer_hash``, ``pivot_tokenizer_hash``, ``dtype``, ``meta.eps``).
    ``require_logprobs``: every shard must carry the teacher's log-probs (format 4, dtype
    ``logp16``); a format-3 shard is refused with one line naming it. Either way all shards of
    one reader have one dtype (a directory is all format 3 or all format 4).
    Opening checks every shard's magic, version, size and header (O(shards)); with
    ``verify_checksum`` each shard's sha256 is checked once, the first time one of its samples
    is read (O(bytes read), not O(dataset) per rank at start): a flipped byte is still caught
    before anything of that shard is used. ``verified`` holds the shards checked so far.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike],
                 expected: Mapping | None = None, *, verify_checksum: bool = True,
                 pattern: str = "*.topk", require_logprobs: bool = False):
        if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
            folder, paths = paths, sorted(Path(paths).glob(pattern))
            if not paths:
                raise TopKStoreError(f"{folder}: no {pattern} shards")
        elif isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        self.headers: list[dict] = []
        self._payloads: list[np.ndarray] = []
        self._where: dict[int, tuple[int, int]] = {}
        self._index: list[np.ndarray] = []
        self._check = verify_checksum
        self.verified: set[int] = set()                 # shard indices whose sha256 was checked
        self.require_logprobs = require_logprobs
        common = ("teacher", "teacher_tokenizer_hash", "pivot_tokenizer_hash", "k", "dataset_hash",
                  "dtype")
        for si, p in enumerate(self.paths):
            header, payload, version = read_container(p, TOPK_MAGIC, verify=False,
                                                      with_version=True)      # size, version
            try:
                self._open(si, p, header, payload, expected, common, version)
            except Exception as e:
                # a header or index that does not fit is reported as corruption when it is
                self._verify_path(p)
                if isinstance(e, TopKStoreError):
                    raise
                raise TopKStoreError(f"{p}: unusable header ({type(e).__name__}: {e})") from None
        if not self.headers:
            raise TopKStoreError("TopKReader: no shard files given")
        self.header = {k: self.headers[0][k] for k in common}
        self.k = int(self.header["k"])
        self.has_logprobs = self.header["dtype"] == LOGP_DTYPE
        self._dtype = None if self.has_logprobs else _DTYPES[self.header["dtype"]]

    def _open(self, si: int, p: Path, header: dict, payload: np.ndarray,
              expected: Mapping | None, common: tuple, version: int) -> None:
        """Header checks and the index of shard ``si`` (no checksum: see the class doc)."""
        for key in (*common, "n_samples"):
            if key not in header:
                raise TopKStoreError(f"{p}: header has no field {key!r}")
        # format 3 stores values (bf16 / fp16), format 4 log-probs: the dtype says which
        if header["dtype"] not in ((LOGP_DTYPE,) if version == 4 else tuple(_DTYPES)):
            raise TopKStoreError(f"{p}: header field 'dtype' is {header['dtype']!r} "
                                 f"(format version {version})")
        if self.require_logprobs and header["dtype"] != LOGP_DTYPE:
            raise TopKStoreError(f"{p}: no teacher log-probs in this shard (format version "
                                 f"{version}, dtype {header['dtype']!r}), the hybrid loss needs "
                                 f"them: re-run megatron-fusion precompute-topk (it writes "
                                 f"format {VERSION}, dtype {LOGP_DTYPE!r})")
        check_expected(p, header, expected)
        if self.headers:  # all shards of one reader come from one teacher run
            check_expected(p, header, {k: self.headers[0][k] for k in common})
        n = int(header["n_samples"])
        if n < 0 or n * _INDEX.itemsize > payload.shape[0]:
            raise TopKStoreError(f"{p}: index of {n} samples does not fit the payload")
        index = np.frombuffer(payload, dtype=_INDEX, count=n)
        for r, sid in enumerate(index["sample_id"].tolist()):
            if sid in self._where:
                self._verify_path(self.paths[self._where[sid][0]])
                raise TopKStoreError(f"{p}: sample id {sid} also in "
                                     f"{self.paths[self._where[sid][0]]}")
            self._where[sid] = (si, r)
        self.headers.append(header)
        self._payloads.append(payload)
        self._index.append(index)

    def verify_all(self) -> None:
        """Check every shard's checksum now (e.g. before reporting samples as missing)."""
        for si, p in enumerate(self.paths):
            if si not in self.verified:
                verify_file_checksum(p)
                self.verified.add(si)

    def _verify_path(self, path) -> None:
        if self._check:
            verify_file_checksum(path)

    def _shard(self, sample_id: int) -> tuple[int, int]:
        """(shard index, row) of ``sample_id``; that shard's checksum verified once first."""
        try:
            si, r = self._where[int(sample_id)]
        except KeyError:
            raise KeyError(f"sample id {int(sample_id)} is in none of the shards "
                           f"({self.paths[0].parent})") from None
        if self._check and si not in self.verified:
            verify_file_checksum(self.paths[si])
            self.verified.add(si)
        return si, r

    def aligned_fraction(self) -> tuple[int, int]:
        """(aligned, response) pivot positions over all shards, from their headers' meta (as
        the precompute wrote them); (0, 0) when the shards do not record them."""
        a = sum(int(h.get("meta", {}).get("aligned_positions", 0)) for h in self.headers)
        r = sum(int(h.get("meta", {}).get("response_positions", 0)) for h in self.headers)
        return a, r

    @property
    def sample_ids(self) -> list[int]:
        return sorted(self._where)

    def __contains__(self, sample_id: int) -> bool:
        return sample_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def get(self, sample_id: int, seq_len: int | None = None, *, logprobs: bool = False):
        """-> values [s, K] float32, ids [s, K] int64, aligned_mask [s] bool at pivot positions
        (zeros where unaligned); ``seq_len`` pads (or cuts) to that length. ``logprobs``: also
        the teacher's top-K log-probs [s, K] float32 (zeros where unaligned; None for a
        format-3 shard). Format 4: log p = the stored code (``decode_logprobs``), values
        ``(log p - c) / d`` (``standardized_from_logprobs``), as the online wire decodes them."""
        si, r = self._shard(sample_id)
        payload, k = self._payloads[si], self.k
        entry = self._index[si][r]
        off, s, rows = int(entry["offset"]), int(entry["n_positions"]), int(entry["n_rows"])
        ids_rows = np.frombuffer(payload, dtype="<i4", count=rows * k, offset=off)
        off += rows * k * 4
        lp_rows = None
        if self.has_logprobs:
            from megatron_fusion.teachers.logprobs import decode_logprobs, standardized_from_logprobs

            d = np.frombuffer(payload, dtype="<f4", count=rows, offset=off)
            c = np.frombuffer(payload, dtype="<f4", count=rows, offset=off + 4 * rows)
            off += rows * 8
            codes = np.frombuffer(payload, dtype="<i2", count=rows * k, offset=off)
            lp_rows = decode_logprobs(torch.from_numpy(codes.copy())).view(rows, k)
            rows_t = standardized_from_logprobs(lp_rows, torch.from_numpy(d.copy()),
                                                torch.from_numpy(c.copy()))
        else:
            val_rows = np.frombuffer(payload, dtype="<i2", count=rows * k, offset=off)
            rows_t = torch.from_numpy(val_rows.copy()).view(self._dtype).float().view(rows, k)
        off += rows * k * 2
        bits = np.frombuffer(payload, dtype=np.uint8, count=(s + 7) // 8, offset=off)
        mask = torch.from_numpy(np.unpackbits(bits, count=s, bitorder="little").astype(bool))
        n = s if seq_len is None else seq_len
        values = torch.zeros(n, k, dtype=torch.float32)
        ids = torch.zeros(n, k, dtype=torch.long)
        aligned = torch.zeros(n, dtype=torch.bool)
        keep = min(s, n)
        ids_t = torch.from_numpy(ids_rows.astype(np.int64)).view(rows, k)
        pos = mask.nonzero().squeeze(1)
        sel = pos < keep
        values[pos[sel]] = rows_t[sel]
        ids[pos[sel]] = ids_t[sel]
        aligned[:keep] = mask[:keep]
        if not logprobs:
            return values, ids, aligned
        logp = None
        if lp_rows is not None:
            logp = torch.zeros(n, k, dtype=torch.float32)
            logp[pos[sel]] = lp_rows[sel]
        return values, ids, aligned, logp

    def batch(self, sample_ids: Sequence[int], seq_len: int, *, logprobs: bool = False):
        """-> values [b, s, K], ids [b, s, K], aligned_mask [b, s] for a micro-batch
        (``logprobs``: + log-probs [b, s, K] float32, None for format-3 shards)."""
        out = [self.get(int(i), seq_len, logprobs=logprobs) for i in sample_ids]
        cols = list(zip(*out))
        return tuple(None if c[0] is None else torch.stack(c) for c in cols)

    def _index_field(self, sample_ids: Sequence[int] | torch.Tensor, name: str) -> np.ndarray:
        if torch.is_tensor(sample_ids):
            sample_ids = sample_ids.reshape(-1).tolist()
        out = []
        for sid in sample_ids:
            si, r = self._shard(sid)
            out.append(self._index[si][r][name])
        return np.array(out, dtype=_INDEX[name])

    def teacher_ce(self, sample_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """-> [b] float32: the teacher's mean NLL (nats/token) on each sample's gold response,
        over its own response tokens. NaN where ``teacher_ce_tokens`` is 0 (no response token
        inside the teacher's window). Not comparable across tokenizers: the teacher weights use
        ``teacher_ce_byte``."""
        return torch.from_numpy(self._index_field(sample_ids, "teacher_ce"))

    def teacher_ce_byte(self, sample_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """-> [b] float32: the same summed NLL per UTF-8 byte of the response text the
        teacher's tokens cover (nats/byte): what minCE / avgCE compare (docs/methods.md §2).
        NaN where ``teacher_ce_bytes`` is 0."""
        return torch.from_numpy(self._index_field(sample_ids, "teacher_ce_byte"))

    def teacher_ce_bytes(self, sample_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """-> [b] int64: how many bytes of response text each ``teacher_ce_byte`` is over."""
        return torch.from_numpy(self._index_field(sample_ids, "teacher_ce_bytes").astype(np.int64))

    def teacher_ce_tokens(self, sample_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """-> [b] int64: how many teacher tokens each ``teacher_ce`` averages over."""
        return torch.from_numpy(self._index_field(sample_ids, "teacher_ce_tokens").astype(np.int64))


# ------------------------------------------------------------------------------------------------
# Source sequence log-probs (FPO)
# ------------------------------------------------------------------------------------------------

@dataclass
class LogprobHeader:
    """What a source log-prob file was made from."""

    source: str                    # source model name
    source_tokenizer_hash: str     # Tokenizer.content_hash of the source model
    dataset_hash: str              # hash of the preference data file (sha256 of its bytes)
    sample_id_start: int = -1      # filled by the writer
    sample_id_end: int = -1
    n_samples: int = 0
    meta: dict = field(default_factory=dict)


class SourceLogprobStore:
    """Per pair: summed log-prob and token count of chosen and rejected under one source model.

    ``SourceLogprobStore.write(path, header, records)`` with records
    ``(sample_id, chosen_logprob, chosen_tokens, rejected_logprob, rejected_tokens)``;
    ``SourceLogprobStore(paths, expected=...)`` reads and validates (one or more shards).
    """

    FIELDS = _LOGPROB.names

    @staticmethod
    def write(path: str | os.PathLike, header: LogprobHeader, records: Iterable[Sequence]) -> None:
        arr = np.array([tuple(r) for r in records], dtype=_LOGPROB)
        if len(arr) and (np.diff(arr["sample_id"]) <= 0).any():
            raise ValueError(f"{path}: sample ids must increase")
        header.n_samples = len(arr)
        header.sample_id_start = int(arr["sample_id"][0]) if len(arr) else -1
        header.sample_id_end = int(arr["sample_id"][-1]) + 1 if len(arr) else -1
        _write_container(path, LOGPROB_MAGIC, asdict(header), [arr.tobytes()])

    def __init__(self, paths, expected: Mapping | None = None, *, verify_checksum: bool = True,
                 pattern: str = "*.logp"):
        if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
            paths = sorted(Path(paths).glob(pattern))
        elif isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise TopKStoreError("SourceLogprobStore: no files given")
        parts, self.headers = [], []
        for p in self.paths:
            header, payload = read_container(p, LOGPROB_MAGIC, verify_checksum)
            check_expected(p, header, expected)
            if self.headers:
                check_expected(p, header, {k: self.headers[0][k] for k in
                                            ("source", "source_tokenizer_hash", "dataset_hash")})
            self.headers.append(header)
            parts.append(np.frombuffer(payload, dtype=_LOGPROB, count=header["n_samples"]))
        self.records = np.concatenate(parts)
        self.header = self.headers[0]
        self._where = {int(s): i for i, s in enumerate(self.records["sample_id"])}
        if len(self._where) != len(self.records):
            raise TopKStoreError(f"{self.paths[0].parent}: a sample id appears twice")

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, sample_id: int) -> bool:
        return sample_id in self._where

    def get(self, sample_id: int) -> dict:
        r = self.records[self._where[sample_id]]
        return {k: r[k].item() for k in self.FIELDS}

    def batch(self, sample_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """-> chosen_logprob, rejected_logprob [b] float64; chosen_tokens, rejected_tokens [b]."""
        idx = [self._where[int(s)] for s in sample_ids]
        r = self.records[idx]
        return {k: torch.from_numpy(np.ascontiguousarray(r[k])) for k in self.FIELDS[1:]}
