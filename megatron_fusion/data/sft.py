"""SFT dataset: JSONL of ``prompt``/``response`` or chat ``messages``, tokenised once and cached.

    ds = SFTDataset("sft.jsonl", tokenizer, seq_len=512, cache_dir="runs/cache")
    item = ds[0]   # tokens [s], labels [s] (= tokens shifted by one), loss_mask [s], sample_id,
                   # length (the slots it takes in a packed row, data/packing.py)
    ds.stats       # counts of kept / truncated / rejected / skipped samples (never silent)

A sample is a list of text *segments* ``(text, is_response)``: ``[(prompt, False), (response,
True)]``, or, for ``messages``, the chat template's rendering cut at each assistant turn (the turn
is the rendered text that ``add_generation_prompt=True`` leaves out, end-of-turn markers included).
Each segment is encoded on its own (so no token straddles the prompt/response boundary), with
BOS first and EOS last; the EOS that ends a response is a response token. Character offsets of
every token are kept in the coordinates of the concatenated text (``sample.text``): that is what
``megatron_fusion.teachers.align`` uses to map teacher positions onto the pivot's (teachers encode the
same segments with ``encode_segments``).

Layout (``seq_len`` = s; the sample's ids are ``[bos, ..., eos]`` of length n):
``tokens = ids[:s]``, ``labels[t] = ids[t+1]``, ``loss_mask[t] = 1`` exactly where ``labels[t]``
is a response token; padding uses ``pad_id`` (EOS when the tokenizer has none) with mask 0.
A sample fits when n <= s + 1. Over-long samples: ``overflow="truncate"`` cuts to s + 1 ids and
counts it, ``"reject"`` drops and counts it, ``"error"`` raises naming file:line. Empty responses:
``empty="skip"`` drops and counts, ``"reject"`` raises naming file:line. A truncated sample whose
response was cut away entirely is dropped and counted as ``dropped_no_response``.
``sample_id`` is the record's index among the file's non-blank lines, stable across tokenizers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_fusion.data.jsonl import JSONLError, read_jsonl, sha256_file
from megatron_fusion.data.packing import sample_slots

log = logging.getLogger(__name__)

Segment = tuple[str, bool]  # (text, is_response)
CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles a ``messages`` record may use
CACHE_FORMAT = 1


@dataclass
class EncodedSample:
    """One sample encoded with one tokenizer (unpadded)."""

    sample_id: int
    line_no: int
    text: str                       # the concatenated segments
    ids: np.ndarray                 # [n] int64
    offsets: np.ndarray             # [n, 2] int64, character spans in ``text``; BOS/EOS zero-width
    is_response: np.ndarray         # [n] bool, token belongs to a response (incl. its EOS)
    response_spans: list[tuple[int, int]]  # character spans of the response segments in ``text``
    segments: list[Segment]         # what was encoded; teachers encode the same segments
    truncated: bool = False


@dataclass
class DatasetStats:
    """What happened to every record; nothing is dropped without being counted here."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    rejected_overflow: int = 0
    skipped_empty: int = 0
    dropped_no_response: int = 0
    tokens: int = 0
    response_tokens: int = 0
    details: list[str] = field(default_factory=list)  # "file:line: why" for every non-kept one

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("details")
        return d


def render_segments(record: dict, tokenizer, *, where: tuple[str, int] = ("?", 0)) -> list[Segment]:
    """Split a record into ``(text, is_response)`` segments (see the module docstring)."""
    path, line_no = where
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs):
            raise JSONLError(path, line_no, "'messages' must be a list of {role: str, content: str}")
        unknown = sorted({m["role"] for m in msgs} - set(CHAT_ROLES))
        if unknown:
            raise JSONLError(path, line_no, f"unknown message role(s) {unknown}; expected "
                             f"one of {list(CHAT_ROLES)}")
        try:
            return _chat_segments(msgs, tokenizer, path, line_no)
        except NotImplementedError as e:   # a tokenizer without a chat template
            raise JSONLError(path, line_no, f"'messages' record: {e}") from None
        except Exception as e:
            if not type(e).__module__.startswith("jinja2"):
                raise
            raise JSONLError(path, line_no, f"chat template of {tokenizer.name!r} failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if "prompt" in record and "response" in record:
        for k in ("prompt", "response"):
            if not isinstance(record[k], str):
                raise JSONLError(path, line_no, f"field {k!r} must be a string")
        return [s for s in ((record["prompt"], False), (record["response"], True)) if s[0]]
    raise JSONLError(path, line_no, "expected 'prompt' and 'response', or 'messages'; "
                     f"has {sorted(record)}")


def _chat_segments(msgs: list[dict], tokenizer, path: str, line_no: int) -> list[Segment]:
    """The segments of a ``messages`` record: each assistant turn is the rendered text that
    ``add_generation_prompt=True`` leaves out (module docstring)."""
    full = tokenizer.apply_chat_template(msgs)
    segs: list[Segment] = []
    pos = 0
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:j], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: j + 1])
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= pos):
            raise JSONLError(path, line_no, f"chat template of {tokenizer.name!r} does not "
                             "render the conversation prefix-consistently; cannot locate "
                             f"assistant turn {j}")
        segs += [(full[pos:len(before)], False), (full[len(before):len(upto)], True)]
        pos = len(upto)
    segs.append((full[pos:], False))
    return [s for s in segs if s[0]]


def encode_segments(tokenizer, segments: Sequence[Segment], *, add_bos: bool = True,
                    add_eos: bool = True) -> tuple[list[int], list[tuple[int, int]], list[bool], str]:
    """Encode each segment on its own and concatenate -> (ids, offsets, is_response, text)."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    is_resp: list[bool] = []
    if add_bos and tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        offsets.append((0, 0))
        is_resp.append(False)
    base = 0
    for text, resp in segments:
        seg_ids, seg_off = tokenizer.encode_with_offsets(text)
        ids += seg_ids
        offsets += [(base + a, base + b) for a, b in seg_off]
        is_resp += [resp] * len(seg_ids)
        base += len(text)
    if add_eos and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
        offsets.append((base, base))
        is_resp.append(bool(segments) and segments[-1][1])
    return ids, offsets, is_resp, "".join(t for t, _ in segments)


def response_spans(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for text, resp in segments:
        if resp:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    return spans


def pack(ids: np.ndarray, is_response: np.ndarray, seq_len: int, pad_id: int) -> dict:
    """-> tokens [s], labels [s], loss_mask [s] (labels[t] = ids[t+1]; mask where it is response)."""
    n = min(len(ids), seq_len + 1)
    tokens = torch.full((seq_len,), pad_id, dtype=torch.long)
    labels = torch.full((seq_len,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(seq_len, dtype=torch.float32)
    ids_t = torch.as_tensor(np.asarray(ids[:n], dtype=np.int64))
    tokens[: min(n, seq_len)] = ids_t[:seq_len]
    if n > 1:
        labels[: n - 1] = ids_t[1:n]
        loss_mask[: n - 1] = torch.as_tensor(np.asarray(is_response[1:n], dtype=np.float32))
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


def _atomic_pickle(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _TokenizedJSONL(torch.utils.data.Dataset):
    """Shared machinery: read, validate, encode once, cache, count."""

    kind = "base"
    required_any: tuple = ()

    def __init__(self, path, tokenizer, seq_len: int, *, cache_dir=None, overflow: str = "truncate",
                 empty: str = "skip", add_bos: bool = True, add_eos: bool = True):
        if overflow not in ("truncate", "reject", "error"):
            raise ValueError(f"overflow must be 'truncate', 'reject' or 'error', got {overflow!r}")
        if empty not in ("skip", "reject"):
            raise ValueError(f"empty must be 'skip' or 'reject', got {empty!r}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.path, self.tokenizer, self.seq_len = Path(path), tokenizer, int(seq_len)
        self.overflow, self.empty, self.add_bos, self.add_eos = overflow, empty, add_bos, add_eos
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        if self.pad_id is None:
            raise ValueError(f"tokenizer {tokenizer.name!r} has neither pad nor eos id to pad with")
        self.file_hash = sha256_file(self.path)
        key = "|".join(map(str, (self.kind, CACHE_FORMAT, self.file_hash, tokenizer.content_hash,
                                 self.seq_len, overflow, empty, add_bos, add_eos)))
        #: identifies (data file, tokenizer, layout); teacher top-K files record it
        self.dataset_hash = hashlib.sha256(key.encode()).hexdigest()
        cache = Path(cache_dir) / f"{self.kind}-{self.dataset_hash[:32]}.pkl" if cache_dir else None
        if cache is not None and cache.exists():
            with open(cache, "rb") as f:
                state = pickle.load(f)
            self._set_state(state)
            self.cache_hit = True
        else:
            self._build()
            self.cache_hit = False
            if cache is not None:
                _atomic_pickle(self._get_state(), cache)
        self.cache_path = cache
        if self.stats.kept < self.stats.records:
            log.warning("%s: kept %d of %d records (%s)", self.path, self.stats.kept,
                        self.stats.records, self.stats.as_dict())

    # subclasses fill these
    def _build(self) -> None:
        raise NotImplementedError

    def _get_state(self) -> dict:
        raise NotImplementedError

    def _set_state(self, state: dict) -> None:
        raise NotImplementedError

    def _encode(self, segments: list[Segment], sample_id: int, line_no: int,
                stats: DatasetStats) -> EncodedSample | None:
        """Encode one response; apply the overflow rule; None when dropped (counted)."""
        where = f"{self.path}:{line_no}"
        ids, offs, resp, text = encode_segments(self.tokenizer, segments, add_bos=self.add_bos,
                                                add_eos=self.add_eos)
        truncated = False
        if len(ids) > self.seq_len + 1:
            if self.overflow == "error":
                raise JSONLError(self.path, line_no, f"sample has {len(ids)} tokens > seq_len + 1 "
                                 f"= {self.seq_len + 1} (overflow='error')")
            if self.overflow == "reject":
                stats.rejected_overflow += 1
                stats.details.append(f"{where}: rejected, {len(ids)} tokens > seq_len+1")
                return None
            ids, offs, resp = ids[: self.seq_len + 1], offs[: self.seq_len + 1], resp[: self.seq_len + 1]
            truncated = True
            if not any(resp[1:]):
                stats.dropped_no_response += 1
                stats.details.append(f"{where}: dropped, truncation removed the whole response")
                return None
        return EncodedSample(sample_id=sample_id, line_no=line_no, text=text,
                             ids=np.asarray(ids, dtype=np.int64),
                             offsets=np.asarray(offs, dtype=np.int64).reshape(-1, 2),
                             is_response=np.asarray(resp, dtype=bool),
                             response_spans=response_spans(segments), segments=list(segments),
                             truncated=truncated)

    def _check_empty(self, segments, line_no, stats, what="response") -> bool:
        """True if the sample has a non-blank response; else skip (counted) or raise."""
        if any(t.strip() for t, r in segments if r):
            return True
        if self.empty == "reject":
            raise JSONLError(self.path, line_no, f"empty {what} (empty='reject')")
        stats.skipped_empty += 1
        stats.details.append(f"{self.path}:{line_no}: skipped, empty {what}")
        return False


class SFTDataset(_TokenizedJSONL):
    """JSONL of ``prompt``/``response`` or ``messages`` -> padded next-token training samples."""

    kind = "sft"

    def _build(self) -> None:
        stats = DatasetStats()
        samples: list[EncodedSample] = []
        for sample_id, (line_no, rec) in enumerate(read_jsonl(self.path)):
            stats.records += 1
            segs = render_segments(rec, self.tokenizer, where=(str(self.path), line_no))
            if not self._check_empty(segs, line_no, stats):
                continue
            s = self._encode(segs, sample_id, line_no, stats)
            if s is None:
                continue
            stats.truncated += s.truncated
            stats.kept += 1
            stats.tokens += len(s.ids)
            stats.response_tokens += int(s.is_response[1:].sum())
            samples.append(s)
        self.samples, self.stats = samples, stats

    def _get_state(self) -> dict:
        return {"samples": self.samples, "stats": self.stats}

    def _set_state(self, state: dict) -> None:
        self.samples, self.stats = state["samples"], state["stats"]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        out = pack(s.ids, s.is_response, self.seq_len, self.pad_id)
        out["sample_id"] = s.sample_id
        out["length"] = sample_slots(len(s.ids), self.seq_len)   # slots it takes when packed
        return out

    def sample(self, i: int) -> EncodedSample:
        """The unpadded encoding of item ``i``: ids, character offsets, text, response spans."""
        return self.samples[i]

    @property
    def sample_ids(self) -> list[int]:
        return [s.sample_id for s in self.samples]

    def index_of(self, sample_id: int) -> int:
        if not hasattr(self, "_by_id"):
            self._by_id = {s.sample_id: i for i, s in enumerate(self.samples)}
        return self._by_id[sample_id]
