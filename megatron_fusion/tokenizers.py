"""Tokenizers behind one small protocol, so data, alignment and teachers never care which kind.

Adapters:
- ``SentencePieceTokenizer``: a SentencePiece ``.model`` file (Mistral v1/v3, Gemma, Llama-2...).
- ``HFTokenizer``: a HF ``tokenizers`` tokenizer (``tokenizer.json`` file or a directory holding
  one), or a GGUF file through ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=...)``.
- ``load_tokenizer(spec)`` picks the adapter from the path.

Offsets are *character* offsets into the encoded text. A token that ends inside a character (a
byte-fallback or byte-level piece of a multi-byte character) gets the end of that character, so
the last of such pieces is the one after which the text is complete (``megatron_fusion.teachers.align``
relies on it). Special tokens added by the data pipeline carry zero-width spans.

``content_hash`` is a sha256 over the bytes that define the tokenizer (the .model file, the
tokenizer.json (+ tokenizer_config.json, which holds the chat template), or the ``tokenizer.*``
metadata of a GGUF file), so caches and teacher top-K files can check they were made with it.

Tiny tokenizers for tests and demos: ``train_sentencepiece`` and ``train_byte_bpe`` (~1 s).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

Offsets = list[tuple[int, int]]


@runtime_checkable
class Tokenizer(Protocol):
    """What the project needs from a tokenizer."""

    name: str
    vocab_size: int
    content_hash: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def id_to_piece(self, i: int) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...


def _sha256_file(path: str | os.PathLike, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def _byte_to_char_maps(text: str) -> tuple[list[int], list[int]]:
    """For each UTF-8 byte index b in [0, nbytes]: the char holding b (floor) and the first char
    starting at or after b (ceil). Pieces that end mid-character get the ceil."""
    floor, ceil = [], []
    for ci, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        floor.extend([ci] * n)
        ceil.append(ci)
        ceil.extend([ci + 1] * (n - 1))
    floor.append(len(text))
    ceil.append(len(text))
    return floor, ceil


def _render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool,
                 bos_token: str = "", eos_token: str = "", name: str = "") -> str:
    if not template:
        raise NotImplementedError(
            f"tokenizer {name!r} has no chat template; pass chat_template=... or use "
            "prompt/response data")
    import jinja2  # transformers' own dependency; imported only when a template is rendered

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token)


def decode_accumulate_offsets(tok: "Tokenizer", ids: Sequence[int], text: str) -> Offsets:
    """Offsets by decoding growing prefixes (for tokenizers that report none).

    Requires ``decode(ids) == text``; O(n^2) decode work, so only a fallback."""
    if tok.decode(list(ids)) != text:
        raise ValueError(f"tokenizer {tok.name!r}: decode(encode(text)) != text, "
                         "so character offsets cannot be recovered by decoding")
    offsets, prev = [], 0
    for i in range(len(ids)):
        end = len(tok.decode(list(ids[: i + 1])))
        # a piece that ends mid-character decodes to U+FFFD; the next piece completes it
        offsets.append((min(prev, end), end))
        prev = end
    return offsets


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file. Offsets come from SentencePiece's own byte spans."""

    def __init__(self, model_file: str | os.PathLike, *, name: str | None = None,
                 chat_template: str | None = None):
        import sentencepiece as spm

        self.path = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.name = name or Path(self.path).name
        self.vocab_size = int(self.sp.vocab_size())
        self.content_hash = _sha256_file(self.path).hexdigest()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        proto = self.sp.encode(text, return_type="proto")
        floor, ceil = _byte_to_char_maps(text)
        ids, offsets = [], []
        for p in proto.pieces:
            ids.append(p.id)
            if p.begin == p.end and self.sp.is_byte(p.id) and p.begin < len(floor) - 1:
                # a leading byte-fallback piece of a multi-byte character: SentencePiece gives it
                # an empty span; give it the character, like byte-level BPE pieces get
                c = floor[p.begin]
                offsets.append((c, c + 1))
            else:
                offsets.append((floor[p.begin], ceil[p.end]))
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(map(int, ids)))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def vocab_pieces(self) -> list[tuple[str, str]]:
        """Every id's ``(piece, kind)``: kind ``"special"`` (control/unknown), ``"byte"`` (a
        ``<0xNN>`` byte-fallback piece) or ``"text"`` (``▁`` marks a word boundary)."""
        out = []
        for i in range(self.vocab_size):
            kind = ("special" if self.sp.is_control(i) or self.sp.is_unknown(i)
                    else "byte" if self.sp.is_byte(i) else "text")
            out.append((self.sp.id_to_piece(i), kind))
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return _render_chat(self.chat_template, messages, add_generation_prompt,
                            "", "", self.name)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r}, vocab={self.vocab_size})"


class HFTokenizer:
    """A HF ``tokenizers.Tokenizer`` (fast, with native character offsets).

    Build with ``HFTokenizer.from_file(tokenizer.json | dir)`` or ``HFTokenizer.from_gguf(file)``.
    """

    def __init__(self, backend, *, name: str, content_hash: str, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None):
        self.tk = backend
        self.name = name
        self.content_hash = content_hash
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self._bos_token, self._eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.pad_id = backend.token_to_id(pad_token) if pad_token else None
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, name: str | None = None) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Tk

        path = Path(path)
        tok_json = path / "tokenizer.json" if path.is_dir() else path
        cfg_path = tok_json.parent / "tokenizer_config.json"
        h = _sha256_file(tok_json)
        cfg: dict = {}
        if cfg_path.exists():
            _sha256_file(cfg_path, h)
            cfg = json.loads(cfg_path.read_text())

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        return cls(_Tk.from_file(str(tok_json)), name=name or tok_json.parent.name,
                   content_hash=h.hexdigest(), bos_token=tok_str(cfg.get("bos_token")),
                   eos_token=tok_str(cfg.get("eos_token")), pad_token=tok_str(cfg.get("pad_token")),
                   chat_template=cfg.get("chat_template"))

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike, *, name: str | None = None) -> "HFTokenizer":
        from transformers import AutoTokenizer

        gguf_path = Path(gguf_path)
        hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        return cls(hf.backend_tokenizer, name=name or gguf_path.stem,
                   content_hash=_gguf_tokenizer_hash(gguf_path), bos_token=hf.bos_token,
                   eos_token=hf.eos_token, pad_token=hf.pad_token,
                   chat_template=getattr(hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        enc = self.tk.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(map(int, ids)), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i))

    def vocab_pieces(self) -> list[tuple[str, str]]:
        """Every id's ``(piece, kind)``: kind ``"special"`` (an added special token),
        ``"byte_level"`` (GPT-2 byte-to-unicode pieces: ``Ġ`` = space, ``Ċ`` = newline),
        ``"byte"`` (a ``<0xNN>`` byte-fallback piece) or ``"text"`` (``▁`` = word boundary)."""
        spec = json.loads(self.tk.to_str())

        def has_byte_level(node) -> bool:
            if isinstance(node, dict):
                return node.get("type") == "ByteLevel" or any(map(has_byte_level, node.values()))
            if isinstance(node, list):
                return any(map(has_byte_level, node))
            return False

        byte_level = has_byte_level(spec.get("pre_tokenizer")) or has_byte_level(
            spec.get("decoder"))
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        special = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        out = []
        for i in range(self.vocab_size):
            piece = self.tk.id_to_token(i) or ""
            if i in special:
                kind = "special"
            elif byte_level:
                kind = "byte_level"
            elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") \
                    and piece.endswith(">"):
                kind = "byte"
            else:
                kind = "text"
            out.append((piece, kind))
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return _render_chat(self.chat_template, messages, add_generation_prompt,
                            self._bos_token or "", self._eos_token or "", self.name)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab={self.vocab_size})"


def _gguf_tokenizer_hash(path: Path) -> str:
    """sha256 over the ``tokenizer.*`` metadata of a GGUF file (not its weights)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    h = hashlib.sha256()
    for key in sorted(k for k in reader.fields if k.startswith("tokenizer.")):
        field = reader.fields[key]
        h.update(key.encode())
        for idx in field.data:
            h.update(bytes(field.parts[idx].tobytes()))
    return h.hexdigest()


def load_tokenizer(spec: str | os.PathLike, *, name: str | None = None) -> Tokenizer:
    """``*.model`` -> SentencePiece; ``*.gguf`` -> GGUF via transformers; a ``tokenizer.json``
    or a directory holding one -> HF tokenizers."""
    p = Path(spec)
    if p.suffix == ".gguf":
        return HFTokenizer.from_gguf(p, name=name)
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            return HFTokenizer.from_file(p, name=name)
        if (p / "tokenizer.model").exists():
            return SentencePieceTokenizer(p / "tokenizer.model", name=name or p.name)
        raise FileNotFoundError(f"{p}: no tokenizer.json or tokenizer.model in this directory")
    if not p.exists():
        raise FileNotFoundError(f"load_tokenizer: {p} does not exist")
    if p.suffix == ".json":
        return HFTokenizer.from_file(p, name=name)
    if ".model" in p.suffixes:  # tokenizer.model, tokenizer.model.v1, ...
        return SentencePieceTokenizer(p, name=name)
    raise ValueError(f"load_tokenizer: cannot tell the tokenizer kind of {p} "
                     "(expected *.model, *.gguf, tokenizer.json or a directory)")


# ---------------------------------------------------------------------------------------------
# Tiny tokenizers for tests and demos
# ---------------------------------------------------------------------------------------------

def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike,
                        model_type: str = "unigram", *, byte_fallback: bool = True,
                        name: str | None = None) -> SentencePieceTokenizer:
    """Train a small SentencePiece model (unigram or bpe) and return it loaded (``out_path``)."""
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sentences = [line for t in texts for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, character_coverage=1.0,
        bos_id=1, eos_id=2, pad_id=3, unk_id=0, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, num_threads=1, minloglevel=2,
    )
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_path)
    return SentencePieceTokenizer(out_path, name=name)


def train_byte_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
                   name: str | None = None) -> HFTokenizer:
    """Train a small byte-level BPE (GPT-2 style, HF tokenizers); writes ``out_dir/tokenizer.json``
    and a ``tokenizer_config.json`` with bos/eos/pad and a ChatML template."""
    from tokenizers import Tokenizer as _Tk, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tk = _Tk(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(list(texts), trainer=trainer)
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
           "chat_template": chatml}
    for fname, payload in (("tokenizer.json", tk.to_str()), ("tokenizer_config.json",
                                                             json.dumps(cfg, indent=1))):
        tmp = out_dir / (fname + ".tmp")
        tmp.write_text(payload)
        os.replace(tmp, out_dir / fname)
    return HFTokenizer.from_file(out_dir, name=name)
