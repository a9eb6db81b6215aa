"""Controlled fusion experiment: SFT-only vs ULD vs ULD + GLD, same pivot init, data and tokens.

    python -m demos.fusion_experiment --world real [--out runs/fusion_real] [--arms ...] [--seeds 1,2,3]
        real teachers (SmolLM2-135M-Instruct, Gemma-3-270M) on real text, bits per byte:
        demos/fusion_real.py (its options: --world real --help)

The default world (``--world tiny``) is the one below:
    python -m demos.fusion_experiment [--out runs/experiment] [--steps 200] [--teacher-steps 300]
                                      [--arms sft,uld,uld_gld] [--seed N] [--accuracy]
                                      [--write docs/experiments.md]

Two single-skill teachers with different tokenizers (arithmetic: byte-level BPE, string tasks:
SentencePiece BPE) are trained and their top-K precomputed exactly as in the demo
(demos.tiny.prepare). Then the pivot is trained three times from one shared step-0
checkpoint with the same data order and number of steps:
  sft      CE only                     (stage sft)
  uld      CE + ULD                    (stage fuse, lambda_gld = 0)
  uld_gld  CE + ULD + 0.5 GLD          (stage fuse, defaults)
and held-out CE per domain is reported. Numbers are what they are; the table says so.

``--arms`` picks the arms (comma-separated, default ``sft,uld,uld_gld`` = the three above):
  sft            CE only
  uld[@U]        CE + U*ULD, GLD off            (U omitted: the config's lambda_uld, 1.0)
  uld_gld[@U[/G]] CE + U*ULD + G*GLD            (omitted parts: the config's 1.0 / 0.5;
                                                 ``uld_gld@U`` sets U only)
e.g. ``--arms sft,uld@0.1,uld@0.3,uld_gld@0.3/0.1``. Every arm starts from the same step-0
checkpoint with the same data order and steps; arm ``a`` writes ``<out>/pivot_<a>`` with ``@`` and
``/`` replaced by ``_``. Re-running reuses finished data, teachers, top-K and the step-0 init.
``--seed N`` sets the arms' ``train.seed`` (data order; the step-0 init stays the shared one) and
adds ``_sN`` to their directories: a replicate with another data order, for a noise estimate.
``--accuracy`` adds held-out exact match by greedy decoding (decoded response == gold response).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path


from demos.common import train
from demos.tiny import prepare


def final_eval(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if any(k.startswith("eval/") for k in r)]
    return ev[-1] if ev else {}


def greedy_accuracy(run_dir: Path, valid: dict[str, str], tokenizer: str,
                    max_len: int = 128) -> dict[str, float]:
    """Held-out exact match: greedy-decode each prompt (``[bos] + prompt`` as in training) until
    eos or ``max_len`` tokens; correct iff the decoded text equals the gold ``response``.
    One process, TP=1 (the checkpoint is resharded on load)."""
    import torch

    from megatron_fusion.data.jsonl import read_jsonl
    from megatron_fusion.teachers.backends import open_backend
    from megatron_fusion.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)
    acc = {}
    with open_backend("megatron", checkpoint=str(run_dir), what="pivot") as (be, _, _):
        for name, path in valid.items():
            recs = [r for _, r in read_jsonl(path)]
            hits = 0
            for r in recs:
                ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(r["prompt"])
                start = len(ids)
                while len(ids) < max_len:
                    logits = be.local_logits(torch.tensor([ids]))[0, -1, :be.vocab_size]
                    nxt = int(logits.argmax())
                    if nxt == tok.eos_id:
                        break
                    ids.append(nxt)
                hits += tok.decode(ids[start:]).strip() == r["response"].strip()
            acc[name] = hits / len(recs)
    return acc


def parse_arms(spec: str) -> dict[str, list[str]]:
    """``"sft,uld@0.1,uld_gld@0.3/0.1"`` -> {label: trainer overrides}, in order."""
    arms: dict[str, list[str]] = {}
    for label in (a.strip() for a in spec.split(",")):
        if not label:
            continue
        kind, _, lam = label.partition("@")
        parts = lam.split("/") if lam else []
        try:
            vals = [float(x) for x in parts]
        except ValueError:
            raise ValueError(f"arm {label!r}: lambdas must be numbers") from None
        if kind == "sft" and not parts:
            extra = ["stage=sft"]
        elif kind == "uld" and len(parts) <= 1:
            extra = [f"fuse.lambda_uld={vals[0]}"] if vals else []
            extra.append("fuse.lambda_gld=0")
        elif kind == "uld_gld" and len(parts) <= 2:
            extra = [f"fuse.lambda_{n}={v}" for n, v in zip(("uld", "gld"), vals)]
        else:
            raise ValueError(f"arm {label!r}: expected sft, uld[@U] or uld_gld[@U[/G]]")
        if label in arms:
            raise ValueError(f"arm {label!r} given twice")
        arms[label] = extra
    if not arms:
        raise ValueError("no arms given")
    return arms


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--world", choices=["tiny", "real"], default="tiny")
    world, rest = pre.parse_known_args(argv)
    if world.world == "real":
        from demos import fusion_real

        ap = argparse.ArgumentParser(prog="python -m demos.fusion_experiment --world real",
                                     description=fusion_real.__doc__.splitlines()[0])
        ap.add_argument("--out", default="runs/fusion_real")
        ap.add_argument("--arms", default=fusion_real.DEFAULT_ARMS,
                        help="LOSS[@TEACHERS][/WEIGHTING], comma-separated; LOSS in "
                             f"{', '.join(fusion_real.LOSSES)}; TEACHERS 'all' or names joined "
                             "by '&' (default: %(default)s)")
        fusion_real.add_args(ap)
        return fusion_real.main_real(ap.parse_args(rest))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=["tiny", "real"], default="tiny",
                    help="tiny: the synthetic world below (default); real: demos/fusion_real.py")
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--arms", default="sft,uld,uld_gld",
                    help="comma-separated arms: sft, uld[@U] (GLD off), uld_gld[@U[/G]]; e.g. "
                         "sft,uld@0.1,uld@0.3,uld_gld@0.3/0.1 (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=None,
                    help="train.seed for the arms (data order; init stays shared); default: config's")
    ap.add_argument("--accuracy", action="store_true",
                    help="also held-out exact match of the response by greedy decoding (slower)")
    ap.add_argument("--write", default=None, help="append the result table to this markdown file")
    args = ap.parse_args(argv)
    try:
        arms = parse_arms(args.arms)
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out)
    data = prepare(out, args.teacher_steps)
    common = [f"data.train={data['train']}", f"data.tokenizer={data['pivot_tokenizer']}",
              f"data.valid=[{data['valid_arith']},{data['valid_string']}]",
              f"fuse.teachers.0.tokenizer={out}/teachers/arith_tok",
              f"fuse.teachers.0.topk_dir={out}/topk/arith",
              f"fuse.teachers.1.tokenizer={out}/teachers/string.model",
              f"fuse.teachers.1.topk_dir={out}/topk/string",
              "logging.wandb_mode=disabled", "logging.progress=false", "checkpoint.interval=0",
              f"train.eval_interval={args.steps}", "train.eval_batches=8"]
    if not (out / "init" / "checkpoints" / "latest").exists():  # a step-0 checkpoint cannot be resumed
        train("configs/demo/tiny_fuse.yaml", 2, common + [f"run.dir={out}/init", "train.steps=0", "stage=sft"],
               "shared pivot init (step 0)")
    results = {}
    for arm, extra in arms.items():
        run_dir = out / f"pivot_{arm.replace('@', '_').replace('/', '_')}"
        if args.seed is not None:
            extra = extra + [f"train.seed={args.seed}"]
            run_dir = run_dir.with_name(f"{run_dir.name}_s{args.seed}")
        train("configs/demo/tiny_fuse.yaml", 2, common + extra + [
            f"run.dir={run_dir}", f"train.steps={args.steps}", f"checkpoint.load={out}/init"],
            f"pivot arm '{arm}' ({args.steps} steps)")
        results[arm] = final_eval(run_dir)
        if args.accuracy:
            acc = greedy_accuracy(run_dir, {"arith": data["valid_arith"], "string": data["valid_string"]},
                                  data["pivot_tokenizer"])
            results[arm].update({f"acc/{k}": v for k, v in acc.items()})
    cmd = f"python -m demos.fusion_experiment --steps {args.steps}"
    if args.teacher_steps != 300:
        cmd += f" --teacher-steps {args.teacher_steps}"
    if args.out != "runs/experiment":
        cmd += f" --out {args.out}"
    if args.arms != "sft,uld,uld_gld":
        cmd += f" --arms {args.arms}"
    if args.seed is not None:
        cmd += f" --seed {args.seed}"
    if args.accuracy:
        cmd += " --accuracy"
    lines = [f"\n### Run of {datetime.date.today()} ({platform.node()}, {args.steps} pivot steps, "
             f"teachers {args.teacher_steps} steps; `{cmd}`)\n",
             "| arm | held-out CE arithmetic | held-out CE string tasks | mean |"
             + (" exact match arithmetic | exact match string |" if args.accuracy else ""),
             "|---|---|---|---|" + ("---|---|" if args.accuracy else "")]
    for arm, ev in results.items():
        a, s = ev.get("eval/valid_arith/ce", float("nan")), ev.get("eval/valid_string/ce", float("nan"))
        lines.append(f"| {arm} | {a:.4f} | {s:.4f} | {(a + s) / 2:.4f} |" + (
            f" {ev['acc/arith']:.3f} | {ev['acc/string']:.3f} |" if args.accuracy else ""))
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.write:
        with open(args.write, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
