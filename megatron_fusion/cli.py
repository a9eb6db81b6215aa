"""The `megatron-fusion` command: every tool of the project, each an argparse body here.

    megatron-fusion train --config configs/test/tiny_cpu.yaml [--nproc N] [dotted.key=value ...]
    megatron-fusion plan  --config configs/recipes/fuse_14b.yaml --nodes 4 --gpus-per-node 8
    megatron-fusion precompute-topk --backend hf --teacher-model DIR --teacher-name qwen \\
        --data sft.jsonl --pivot-tokenizer PIVOT --seq-len 4096 --out topk/qwen
    megatron-fusion precompute-logprobs --backend hf --source-model DIR --source-name qwen \\
        --data pairs.jsonl --seq-len 4096 --out logprobs/qwen
    megatron-fusion match-vocab --teacher-tokenizer QWEN_TOK --pivot-tokenizer PIVOT --out qwen.vmap
    megatron-fusion convert hf-to-megatron --hf HF_DIR --out RUN_DIR [--tp 2 --pp 2] [--spec te|local]
    megatron-fusion convert megatron-to-hf --megatron RUN_DIR --out HF_DIR [--arch ... --dtype ...]
    megatron-fusion convert check --hf HF_DIR --megatron RUN_DIR [--tp 2 --pp 2] [--tol 1e-4]

`train` starts torchrun's agent itself (``--nproc``; default: as many ranks as the config
needs), runs ``python -m megatron_fusion.train`` on every rank, and names a rank that dies by its
role (student, or which teacher: ``megatron_fusion.supervise``). The precompute commands with
``--backend megatron`` run under ``torchrun --nproc-per-node TP -m megatron_fusion.cli ...``:
all ranks form one teacher TP group and rank 0 writes. ``tools/*.py`` of the same names are thin
wrappers around these bodies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

COMMANDS = ("train", "plan", "precompute-topk", "precompute-logprobs", "match-vocab", "convert")


# --- train ------------------------------------------------------------------------------------

def train_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-fusion train")
    ap.add_argument("--config", required=True)
    ap.add_argument("--nproc", type=int, default=None,
                    help="ranks to start (default: what the config needs: tp*pp + online teacher ranks)")
    args, overrides = ap.parse_known_args(argv)
    from megatron_fusion.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides)
        nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp + cfg.online_teacher_ranks()
        cfg.validate_layout(nproc)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from megatron_fusion.supervise import run_torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "megatron_fusion.train",
                         "--config", args.config, *overrides], cfg, nproc)


# --- plan -------------------------------------------------------------------------------------

def plan_main(argv: list[str] | None = None) -> int:
    from megatron_fusion import plan
    from megatron_fusion.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="megatron-fusion plan", description=plan.__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    ap.add_argument("--teacher-nodes", type=int, default=None,
                    help="spread this many nodes over the online teachers (overrides their ranks)")
    args, overrides = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, overrides)
        teacher_args = []
        if args.teacher_nodes is not None:
            teacher_args = plan.teacher_rank_overrides(cfg, args.teacher_nodes, args.nodes, args.gpus_per_node)
            cfg = plan.with_overrides(cfg, teacher_args)
        p = plan.make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_mem_gb)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(plan.render(p, args.config))
    if p.fits:
        print("result: fits")
        return 0
    print("result: DOES NOT FIT")
    found = plan.search(cfg, args.nodes, args.gpus_per_node, args.gpu_mem_gb)
    if found is None:
        print(f"suggestion: none on {args.nodes} node(s); add nodes or give the teachers more ranks")
        return 1
    suggested, splan = found
    base = [f"--config {args.config}", f"--nodes {args.nodes}", f"--gpus-per-node {args.gpus_per_node}",
            f"--gpu-mem-gb {args.gpu_mem_gb:g}"]
    if args.teacher_nodes is not None:
        base.append(f"--teacher-nodes {args.teacher_nodes}")
    print(f"suggestion: a layout that fits (student peak {splan.student_peak / plan.GIB:.1f} GiB):")
    keys = {o.split("=", 1)[0] for o in suggested}
    kept = [o for o in overrides if o.split("=", 1)[0] not in keys]
    print("  megatron-fusion plan " + " ".join(base + kept + suggested))
    return 1


# --- precompute: the frozen-model flags, defined once --------------------------------------------

def add_backend_args(ap: argparse.ArgumentParser, what: str) -> None:
    """The frozen-model flags of ``precompute-topk`` (``what="teacher"``) and
    ``precompute-logprobs`` (``what="source"``); ``open_backend_from_args`` opens the model."""
    from megatron_fusion.teachers.backends import MODEL_DTYPES

    ap.add_argument("--backend", choices=["hf", "megatron"], default="hf",
                    help=f"hf: a transformers model (--{what}-model); megatron: a megatron-fusion "
                    "run (--checkpoint), tensor-parallel over the torchrun ranks")
    ap.add_argument(f"--{what}-model", default=None, help="HF model directory (or the GGUF's)")
    ap.add_argument("--checkpoint", default=None,
                    help="--backend megatron: run dir (its latest checkpoint) or a checkpoint dir")
    ap.add_argument("--gguf-file", default=None, help=f"GGUF file name inside --{what}-model")
    ap.add_argument(f"--{what}-tokenizer", default=None,
                    help=f"{what} tokenizer (default: the model directory / its GGUF; for "
                    "--backend megatron the run's data.tokenizer)")
    ap.add_argument("--device", default=None,
                    help="cuda (= cuda:LOCAL_RANK), cuda:N or cpu; default: cuda when CUDA is "
                    "available, else cpu (--backend megatron: always that default)")
    ap.add_argument("--dtype", choices=["auto", *MODEL_DTYPES], default="auto",
                    help="dtype the model is loaded and run in; auto: hf bf16 on CUDA, fp32 on "
                    "CPU; megatron the run's train.precision")


def open_backend_from_args(args, what: str):
    """``teachers.backends.open_backend`` for the flags of ``add_backend_args``."""
    from megatron_fusion.teachers.backends import open_backend

    return open_backend(args.backend, model_dir=getattr(args, f"{what}_model"),
                        gguf_file=args.gguf_file, checkpoint=args.checkpoint,
                        tokenizer=getattr(args, f"{what}_tokenizer"), what=what,
                        device=args.device, dtype=args.dtype)


def _add_output_args(ap: argparse.ArgumentParser, samples_per_shard: int) -> None:
    """Flags both precompute commands share: shard size, batching, data encoding, progress."""
    ap.add_argument("--samples-per-shard", type=int, default=samples_per_shard)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--overflow", choices=["truncate", "reject", "error"], default="truncate")
    ap.add_argument("--empty", choices=["skip", "reject"], default="skip")
    ap.add_argument("--cache-dir", default=None, help="tokenised-data cache directory")
    ap.add_argument("--no-progress", action="store_true")


def _run_with_backend(ap: argparse.ArgumentParser, args, what: str, compute) -> dict:
    """Open the frozen model (a bad --device/--dtype is an argparse error, before any loading),
    run ``compute(backend, tokenizer_spec, is_writer) -> summary``, print it on the writer."""
    from megatron_fusion.teachers.backends import backend_info

    try:
        opened = open_backend_from_args(args, what)
        backend, tok_spec, write = opened.__enter__()
    except ValueError as e:
        ap.error(str(e))
    try:
        summary = compute(backend, tok_spec, write)
        summary.update(backend_info(backend))
        if write:
            print(json.dumps({k: v for k, v in summary.items() if k != "paths"}, indent=1))
    finally:
        opened.__exit__(None, None, None)
    return summary


def precompute_topk_main(argv: list[str] | None = None) -> dict:
    """``precompute-topk``: one teacher over one SFT file; returns the summary (rank 0 prints it)."""
    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.teachers.precompute import precompute_teacher_topk
    from megatron_fusion.tokenizers import load_tokenizer

    ap = argparse.ArgumentParser(prog="megatron-fusion precompute-topk",
                                 description="Precompute a teacher's standardised top-K at the "
                                 "pivot's response positions (docs/methods.md §6 shards).")
    ap.add_argument("--data", required=True, help="SFT JSONL (prompt/response or messages)")
    ap.add_argument("--pivot-tokenizer", required=True, help="pivot tokenizer (.model, dir, .gguf)")
    add_backend_args(ap, "teacher")
    ap.add_argument("--teacher-name", required=True, help="teacher name as in the fusion config")
    ap.add_argument("--out", required=True, help="output directory for the shards")
    ap.add_argument("--seq-len", type=int, required=True, help="pivot sequence length")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--alignment", choices=["offset", "offset_next", "mined"], default="offset",
                    help="methods.md §1 (offset_next: only where the next tokens align too)")
    ap.add_argument("--shard-dtype", choices=["logp16", "bfloat16", "float16"], default="logp16",
                    help="what the shards store per top-K entry (the header's dtype): logp16 = "
                         "the teacher's log-probs in 16-bit fixed point + sigma+eps and mu-lse "
                         "(format 4, what fuse.loss=hybrid needs; 68 B/position at K=10); "
                         "bfloat16 / float16 = the standardised values only (format 3, uld)")
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--max-teacher-len", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=0.8, help="warn under this aligned fraction")
    ap.add_argument("--vocab-match", default=None,
                    help="teacher -> pivot vocabulary-match cache (megatron-fusion match-vocab; "
                         "made here if missing): the matched top-K mass the summary and the shard "
                         "headers report. Default: the match is built in memory")
    _add_output_args(ap, samples_per_shard=256)
    args = ap.parse_args(argv)

    def compute(backend, tok_spec, write):
        teacher_tok = load_tokenizer(tok_spec, name=args.teacher_name)
        ds = SFTDataset(args.data, load_tokenizer(args.pivot_tokenizer), args.seq_len,
                        cache_dir=args.cache_dir, overflow=args.overflow, empty=args.empty)
        summary = precompute_teacher_topk(
            ds, teacher_tok, backend, args.out, teacher=args.teacher_name, k=args.k,
            alignment=args.alignment, eps=args.eps, dtype=args.shard_dtype,
            samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
            max_teacher_len=args.max_teacher_len, threshold=args.threshold, write=write,
            progress=not args.no_progress, match_cache=args.vocab_match)
        summary["dataset_stats"] = ds.stats.as_dict()
        return summary

    return _run_with_backend(ap, args, "teacher", compute)


def precompute_logprobs_main(argv: list[str] | None = None) -> dict:
    """``precompute-logprobs``: one source model over one preference file (FPO, methods.md §5)."""
    from megatron_fusion.data.preference import PreferenceDataset
    from megatron_fusion.teachers.source_logprobs import precompute_source_logprobs
    from megatron_fusion.tokenizers import load_tokenizer

    ap = argparse.ArgumentParser(prog="megatron-fusion precompute-logprobs",
                                 description="Score prompt+chosen / prompt+rejected with one "
                                 "source model and its own tokenizer (FPO, docs/methods.md §5).")
    ap.add_argument("--data", required=True, help="preference JSONL (prompt/chosen/rejected)")
    add_backend_args(ap, "source")
    ap.add_argument("--source-name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, required=True, help="max tokens per side (source)")
    _add_output_args(ap, samples_per_shard=1024)
    args = ap.parse_args(argv)

    def compute(backend, tok_spec, write):
        ds = PreferenceDataset(args.data, load_tokenizer(tok_spec, name=args.source_name),
                               args.seq_len, cache_dir=args.cache_dir, overflow=args.overflow,
                               empty=args.empty)
        return precompute_source_logprobs(
            ds, backend, args.out, source=args.source_name,
            samples_per_shard=args.samples_per_shard, batch_size=args.batch_size, write=write,
            progress=write and not args.no_progress)

    return _run_with_backend(ap, args, "source", compute)


# --- convert ------------------------------------------------------------------------------------

def _convert_parser() -> argparse.ArgumentParser:
    from megatron_fusion.convert import SUPPORTED_ARCHITECTURES

    ap = argparse.ArgumentParser(prog="megatron-fusion convert",
                                 description="HF <-> Megatron checkpoint conversion, and its check.")
    sub = ap.add_subparsers(dest="direction", required=True)
    h = sub.add_parser("hf-to-megatron", help="a Hugging Face Llama(-3.x)/Mistral/Qwen2/Qwen3/Phi-3 model -> a "
                       "Megatron run dir (train from it with checkpoint.load=OUT)")
    h.add_argument("--hf", required=True, help="HF model dir (config.json + safetensors)")
    h.add_argument("--out", required=True, help="Megatron run dir to write")
    h.add_argument("--tp", type=int, default=1, help="training TP (sets the vocab padding)")
    h.add_argument("--pp", type=int, default=1, help="training PP (checked for divisibility)")
    h.add_argument("--spec", choices=["te", "local"], default=None,
                   help="layer spec whose parameter names the checkpoint uses (default: te when "
                        "Transformer Engine imports on a GPU here, else local); either loads into both")
    m = sub.add_parser("megatron-to-hf", help="a Megatron run/checkpoint -> a Hugging Face dir")
    m.add_argument("--megatron", required=True, help="run dir, checkpoints root or iter_* dir")
    m.add_argument("--out", required=True, help="HF dir to write")
    m.add_argument("--arch", choices=sorted(SUPPORTED_ARCHITECTURES), default=None,
                   help="HF architecture (default: the one the run was converted from)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    c = sub.add_parser("check", help="max |logit difference| between an HF model and its "
                       "Megatron conversion on random tokens (last line: max_abs_logit_diff V)")
    c.add_argument("--hf", required=True)
    c.add_argument("--megatron", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--seq", type=int, default=16)
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--tol", type=float, default=1e-4, help="fail above this (fp32 default)")
    return ap


def convert_main(argv: list[str]) -> int:
    from megatron_fusion import convert

    a = _convert_parser().parse_args(argv)
    if a.direction == "check":
        diff = convert.check_conversion(a.hf, a.megatron, tp=a.tp, pp=a.pp, batch=a.batch, seq=a.seq)
        ok = math.isfinite(diff) and diff <= a.tol
        print(f"tp={a.tp} pp={a.pp} tol={a.tol}: {'OK' if ok else 'FAIL'}")
        print(f"max_abs_logit_diff {diff:.3e}")
        return 0 if ok else 1
    try:
        if a.direction == "hf-to-megatron":
            # fail fast, before any import cost
            arch, m = convert.model_config_from_hf(convert.read_hf_config(a.hf))
            convert.validate_layout(m, a.tp, a.pp)
            spec = a.spec or convert.default_layer_spec()
            ckpt = convert.single_process(convert.hf_to_megatron, a.hf, a.out, tp=a.tp, pp=a.pp,
                                          spec=spec)
            extras = "".join([f", llama3 RoPE scaling x{m.rope_scaling_factor:g}" if m.rope_scaling else "",
                              ", q/k norms" if m.qk_layernorm else ""])
            print(f"{arch} -> {ckpt} (tp={a.tp} pp={a.pp}, padded vocab "
                  f"{m.padded_vocab_size(a.tp)}, {spec} layer spec{extras})")
        else:
            out = convert.single_process(convert.megatron_to_hf, a.megatron, a.out, arch=a.arch,
                                         dtype=a.dtype)
            print(f"wrote {out}")
    except convert.ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# --- match-vocab --------------------------------------------------------------------------------

def match_vocab_main(argv: list[str] | None = None) -> int:
    """``match-vocab``: build the teacher -> pivot vocabulary match (methods.md §9) into its checked
    cache file, or check an existing one against both tokenizers; prints a JSON summary."""
    from megatron_fusion.errors import UserError
    from megatron_fusion.teachers.vocab_match import VocabMatch
    from megatron_fusion.tokenizers import load_tokenizer

    ap = argparse.ArgumentParser(prog="megatron-fusion match-vocab",
                                 description=match_vocab_main.__doc__.splitlines()[0])
    ap.add_argument("--teacher-tokenizer", required=True, help="teacher tokenizer (.model, dir, "
                    "tokenizer.json, .gguf)")
    ap.add_argument("--pivot-tokenizer", required=True, help="pivot tokenizer")
    ap.add_argument("--out", required=True, help="the cache file (written atomically)")
    ap.add_argument("--check", action="store_true",
                    help="only check an existing cache (error if there is none)")
    args = ap.parse_args(argv)
    out = args.out
    try:
        teacher = load_tokenizer(args.teacher_tokenizer)
        pivot = load_tokenizer(args.pivot_tokenizer)
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    existed = os.path.exists(out)
    try:
        if args.check and not existed:
            raise UserError(f"{out}: file not found (--check checks an existing cache)")
        match = VocabMatch.load_or_build(out, teacher, pivot)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "action": "checked" if existed else "built",
                      "matched": match.n_matched, "teacher_vocab": match.teacher_vocab_size,
                      "pivot_vocab": match.pivot_vocab_size,
                      "matched_fraction_of_teacher_vocab": match.matched_fraction,
                      "matched_fraction_of_pivot_vocab":
                          match.n_matched / max(1, match.pivot_vocab_size),
                      "teacher_tokenizer_hash": match.teacher_hash,
                      "pivot_tokenizer_hash": match.pivot_hash}, indent=1))
    return 0


# --- dispatch -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd == "plan":
        return plan_main(rest)
    if cmd == "precompute-topk":
        precompute_topk_main(rest)
        return 0
    if cmd == "precompute-logprobs":
        precompute_logprobs_main(rest)
        return 0
    if cmd == "match-vocab":
        return match_vocab_main(rest)
    if cmd == "convert":
        return convert_main(rest)
    print(f"megatron-fusion: unknown command {cmd!r} ({', '.join(COMMANDS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
