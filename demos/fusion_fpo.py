"""FPO vs DPO in the real world of the fusion experiment (``--world real --fpo``; issue #16).

Does InfiFPO's fused source reference (methods.md §5) move a pivot's held-out preferences more
than plain DPO? Both arms run the same ``stage: fpo`` from the same start, on the same pairs, for
the same steps; only the sources differ:

- ``dpo``: the frozen start pivot is the only "source" (its own sequence log-probs, precomputed
  with ``tools/precompute_source_logprobs.py --backend megatron``), so the fused, clipped
  reference is the pivot's own log-prob: plain DPO with length normalisation;
- ``fpo``: the real teachers of the world (SmolLM2-135M-Instruct, Gemma-3-270M; ``--backend hf``,
  each with its own tokenizer) are the sources, fused by max margin and clipped around the pivot.

Start: each seed's ``sft`` pivot of the fusion experiment (so ``sft`` must be one of its arms).
Pairs: ``megatron_fusion.data.synthetic.preference_pairs`` (checkable answers: the chosen response
is correct, the rejected one a plausible wrong answer), training and held-out from disjoint seeds.
Metrics (the stage's own ``evaluate`` on ``fpo.valid_preference``): ``eval/pref_accuracy`` (pairs
with ℓ(chosen) > ℓ(rejected)) and ``eval/pref_margin`` (mean ℓ(chosen) − ℓ(rejected)), before
(step 0) and after training; paired differences fpo − dpo per seed. Cached like the rest:
``<out>/pref/`` holds the pairs, the log-probs and one ``result.json`` per (arm, seed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from demos.common import env, eval_table, run, train
from demos.fusion_real import atomic_json, models

ARMS = ("dpo", "fpo")


@dataclass
class PrefSizes:
    """The preference part's sizes (the pivot's come from the fusion experiment's Sizes)."""

    n_pairs: int = 256
    """Training pairs."""
    n_valid: int = 128
    """Held-out pairs (accuracy and margin)."""
    steps: int = 40
    """FPO / DPO steps per arm."""
    micro_batch: int = 4
    """Pairs per micro-batch."""
    global_batch: int = 16
    """Pairs per step."""
    lr: float = 3e-4
    """Peak learning rate (cosine to lr/10)."""
    seq_len: int = 160
    """Sequence length of a prompt + response (the pivot's RoPE takes any; pairs are ~70-110
    SmolLM2 tokens)."""

    def __post_init__(self):
        for k, v in vars(self).items():
            if v <= 0:
                raise ValueError(f"pref sizes.{k}: must be > 0, got {v}")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"pref sizes.global_batch: {self.global_batch} is not a multiple of "
                             f"micro_batch={self.micro_batch}")


def make_pairs(out: Path, sizes: PrefSizes) -> dict[str, str]:
    """``train.jsonl`` / ``valid.jsonl`` of preference pairs under ``out`` (cached by a stamp)."""
    from megatron_fusion.data.jsonl import write_jsonl
    from megatron_fusion.data.synthetic import preference_pairs

    paths = {"train": out / "train.jsonl", "valid": out / "valid.jsonl"}
    spec = {"n_pairs": sizes.n_pairs, "n_valid": sizes.n_valid}
    stamp = out / "DONE"
    if stamp.exists():
        if json.loads(stamp.read_text()) != spec:
            raise SystemExit(f"fusion_fpo: {out} holds pairs of other sizes ({stamp.read_text()}); "
                             "use another --out")
        return {k: str(v) for k, v in paths.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(paths["train"], preference_pairs(sizes.n_pairs, 104729))
    write_jsonl(paths["valid"], preference_pairs(sizes.n_valid, 424242))
    stamp.write_text(json.dumps(spec))
    return {k: str(v) for k, v in paths.items()}


def source_logprobs(out: Path, name: str, pairs: str, seq_len: int, *, model_dir: str | None = None,
                    tokenizer: str | None = None, checkpoint: str | None = None) -> str:
    """One source's sequence log-probs of the training pairs (HF model, or a Megatron run dir),
    cached: a finished file set is reused."""
    dst = out / "logprobs" / name
    if (dst / "DONE").exists():
        return str(dst)
    cmd = [sys.executable, "tools/precompute_source_logprobs.py", "--data", pairs,
           "--source-name", name, "--seq-len", str(seq_len), "--out", str(dst), "--batch-size", "4",
           "--no-progress"]
    if checkpoint is not None:
        cmd += ["--backend", "megatron", "--checkpoint", checkpoint]
    else:
        cmd += ["--backend", "hf", "--source-model", model_dir, "--source-tokenizer", tokenizer]
    run(cmd, f"source '{name}': sequence log-probs of {pairs}",
        env_vars=dict(env(), OMP_NUM_THREADS=str(os.cpu_count() or 1)))
    (dst / "DONE").write_text("ok")
    return str(dst)


def run_fpo(exp, sizes: PrefSizes, sft_dirs: dict[int, Path], config: str) -> dict:
    """Both arms for every seed of ``exp`` (a ``fusion_real.Experiment`` after ``run``), from
    ``sft_dirs[seed]``. Returns ``{"arms": {arm: {seed: result}}, "sizes", "sources"}`` and writes
    ``<exp.out>/pref/results.json``."""
    t0 = time.time()
    out = exp.out / "pref"
    pairs = make_pairs(out / "data", sizes)
    seq = sizes.seq_len
    sources = models(exp.teachers)                      # each model once (not its variants)
    teachers = {n: source_logprobs(out, n, pairs["train"], seq, model_dir=t.model_dir,
                                   tokenizer=t.tokenizer)
                for n, t in sources.items()}
    common = exp.sizes.overrides() + [
        "stage=fpo", f"data.train={pairs['train']}", f"data.tokenizer={exp.pivot_tokenizer}",
        f"fpo.valid_preference={pairs['valid']}", f"train.steps={sizes.steps}",
        f"train.micro_batch={sizes.micro_batch}", f"train.global_batch={sizes.global_batch}",
        f"optim.lr={sizes.lr}", f"optim.min_lr={sizes.lr / 10}",
        f"optim.warmup_steps={max(1, sizes.steps // 10)}", "logging.interval=1",
        f"train.eval_interval={sizes.steps}", f"model.seq_length={seq}",
        # every held-out pair is scored (the stage scores eval_batches x micro_batch of them)
        f"train.eval_batches={-(-sizes.n_valid // sizes.micro_batch)}"]
    results: dict[str, dict[str, dict]] = {a: {} for a in ARMS}
    own_dirs = {}
    for seed, start in sft_dirs.items():
        own = source_logprobs(out, f"pivot_s{seed}", pairs["train"], seq, checkpoint=str(start))
        own_dirs[f"pivot_s{seed}"] = own
        srcs = {"dpo": ([own], [exp.pivot_tokenizer]),
                "fpo": (list(teachers.values()), [sources[n].tokenizer for n in teachers])}
        for arm in ARMS:
            rd = out / "runs" / arm / f"s{seed}"
            res_file = rd / "result.json"
            if res_file.exists():
                results[arm][str(seed)] = json.loads(res_file.read_text())
                continue
            files, toks = srcs[arm]
            t1 = time.time()
            train(config, exp.sizes.tp, common + [
                f"run.dir={rd}", f"train.seed={seed}", f"checkpoint.load={start}",
                f"fpo.sources_logprobs=[{','.join(files)}]",
                f"fpo.source_tokenizers=[{','.join(toks)}]"],
                f"{arm} seed {seed}: {sizes.steps} steps from {start}")
            ev = eval_table(rd / "metrics.jsonl")
            if not ev:
                raise SystemExit(f"fusion_fpo: {rd / 'metrics.jsonl'} has no eval/ record")
            res = {k: {m: ev[k][f"eval/{m}"] for m in ("pref_accuracy", "pref_margin")}
                   for k in ("before", "after")} | {"train_s": time.time() - t1, "start": str(start)}
            atomic_json(res_file, res)
            results[arm][str(seed)] = res
            exp.log(f"{arm} seed {seed}: held-out preference accuracy {res['before']['pref_accuracy']:.3f}"
                    f" -> {res['after']['pref_accuracy']:.3f}, margin {res['before']['pref_margin']:+.4f}"
                    f" -> {res['after']['pref_margin']:+.4f}")
    # what the sources (and each start pivot) know about the training pairs before any step
    known = {n: source_preferences(d) for n, d in teachers.items()} | {
        n: source_preferences(d) for n, d in own_dirs.items()}
    summary = {"arms": results, "sizes": vars(sizes), "sources": list(teachers),
               "source_preferences": known, "wall_s": time.time() - t0}
    atomic_json(out / "results.json", summary)
    return summary


def source_preferences(logprob_dir: str | Path) -> dict:
    """A source's own preferences on the TRAINING pairs, from its cached sequence log-probs: the
    share of pairs whose length-normalised log-prob (per token of its own tokenization, as FPO
    uses them, methods.md §5) is higher for the chosen response (``accuracy``; ties count as not),
    the share of ties, and the mean length-normalised margin."""
    from megatron_fusion.teachers.shards import SourceLogprobStore

    r = SourceLogprobStore(logprob_dir, verify_checksum=False).records
    lc = r["chosen_logprob"] / r["chosen_tokens"]
    lr = r["rejected_logprob"] / r["rejected_tokens"]
    return {"pairs": int(len(r)), "accuracy": float((lc > lr).mean()),
            "ties": float((lc == lr).mean()), "margin": float((lc - lr).mean())}


def table(summary: dict) -> str:
    """Held-out preference accuracy and margin per arm (mean over seeds, before -> after) and the
    paired difference fpo - dpo (mean [min, max] over seeds)."""
    arms = summary["arms"]
    seeds = sorted(arms["dpo"], key=int)
    lines = ["| arm | acc before | acc after | margin before | margin after "
             "| Δ acc vs dpo (mean [min, max]) | Δ margin vs dpo |", "|---" * 7 + "|"]

    def mean(arm, when, m):
        return sum(arms[arm][s][when][m] for s in seeds) / len(seeds)

    for arm in ARMS:
        if arm == "dpo":
            deltas = ["—", "—"]
        else:
            deltas = []
            for m in ("pref_accuracy", "pref_margin"):
                d = [arms[arm][s]["after"][m] - arms["dpo"][s]["after"][m] for s in seeds]
                deltas.append(f"{sum(d) / len(d):+.4f} [{min(d):+.4f}, {max(d):+.4f}]")
        lines.append(f"| {arm} | {mean(arm, 'before', 'pref_accuracy'):.4f} "
                     f"| {mean(arm, 'after', 'pref_accuracy'):.4f} "
                     f"| {mean(arm, 'before', 'pref_margin'):+.4f} "
                     f"| {mean(arm, 'after', 'pref_margin'):+.4f} | " + " | ".join(deltas) + " |")
    known = summary.get("source_preferences")
    if known:
        lines += ["", "the sources and the start pivots on the TRAINING pairs (their cached "
                  "log-probs, length-normalised; before any FPO / DPO step)", "",
                  "| source | pairs | chosen preferred | ties | mean margin |", "|---" * 5 + "|"]
        lines += [f"| {n} | {k['pairs']} | {k['accuracy']:.4f} | {k['ties']:.4f} | {k['margin']:+.4f} |"
                  for n, k in known.items()]
    return "\n".join(lines) + "\n"
