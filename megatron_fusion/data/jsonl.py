"""JSONL reading with errors that name the file and the line, and sha256 hashing of data files.

    for line_no, record in read_jsonl(path, required=("prompt", "response")): ...

Blank lines are skipped (they keep their line numbers for later errors). A line that is not valid
UTF-8, not a JSON object, or lacks a required field, or has a field of the wrong type, raises ``JSONLError`` with
``path:line``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Sequence

from megatron_fusion.errors import UserError


class JSONLError(UserError, ValueError):
    """A malformed JSONL line; the message starts with ``file:line``."""

    def __init__(self, path: str | os.PathLike, line_no: int, msg: str):
        self.path, self.line_no = str(path), line_no
        super().__init__(f"{path}:{line_no}: {msg}")


def read_jsonl(path: str | os.PathLike, *, required: Sequence[str] = (),
               str_fields: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_no, record)`` (1-based line numbers) for every non-blank line.

    ``required``: keys that must be present; ``str_fields``: keys that, when present, must be str.
    """
    with open(path, "rb") as f:   # bytes: a bad UTF-8 sequence is reported with its line
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JSONLError(path, line_no, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                 f"byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise JSONLError(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise JSONLError(path, line_no, f"expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise JSONLError(path, line_no, f"missing field(s) {missing}; has {sorted(rec)}")
            for k in str_fields:
                if k in rec and not isinstance(rec[k], str):
                    raise JSONLError(path, line_no,
                                     f"field {k!r} must be a string, got {type(rec[k]).__name__}")
            yield line_no, rec


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Write records atomically (temp file + fsync + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
