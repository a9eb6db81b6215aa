#!/usr/bin/env bash
# The one-GPU check: everything megatron-fusion can only check on a CUDA GPU, in one prepared run.
#
#   make gpu-kit                 # here, with PyPI: the wheels the GPU image lacks, into .whl/
#   bash tools/gpu_check.sh      # there (the device tool's run, carry: [".whl"]), under 8 minutes
#
# On a machine without a CUDA GPU it prints one line "gpu_check: needs a CUDA GPU ..." and exits 2.
# Otherwise it installs .whl/*.whl into a temp dir (pip --no-index --no-deps --target, then
# PYTHONPATH; nothing is fetched), makes its inputs on the machine (demo tokenizer, long SFT
# samples, synthetic teacher top-K shards, a random-weight HF Llama: tools/make_synthetic_topk.py)
# and runs five parts, each under its own time budget (seconds; override with the env vars):
#   1. gpu_tests     python3 -m pytest -q -m gpu tests                        GPU_CHECK_T_TESTS=135
#   2. real_loop     20 steps of the REAL trainer per variant, ~1B Llama bf16 (configs/
#                    gpu_check_1b.yaml): CE only (stage sft) vs CE+ULD+GLD (stage fuse);
#                    step time, tokens/s, TFLOP/s, MFU (989 peak) and vs the 788 GEMM anchor
#                    from metrics.jsonl (tools/bench_gpu.py)                  GPU_CHECK_T_LOOP=180
#   3. bench_losses  tools/bench_losses.py, V=152064, s=4096, bf16, cuda: time, peak memory,
#                    fraction of HBM bandwidth (4.8 TB/s spec, copy measured)  GPU_CHECK_T_LOSSES=60
#   4. precompute    tools/precompute_teacher_topk.py --backend hf --device cuda --dtype bf16 with
#                    the random HF Llama; its shards read back by the trainer's reader
#                                                                              GPU_CHECK_T_PRE=45
#   5. te_resume     save with the Transformer Engine layer spec, resume with the local one and
#                    back (real trainer) -- only if TE imports; else "skipped: no TE"
#                                                                              GPU_CHECK_T_TE=60
# A part that fails or runs out of time is recorded and the next one runs. Results: ONE file,
# ${OUT:-runs/gpu_check}/gpu_check.json, with each part's log beside it (at most 8 files, what the
# device tool brings back). Exit 0 when every part passed (or was skipped), 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${GPU_CHECK_PYTHON:-python3}"

if ! "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
  echo "gpu_check: needs a CUDA GPU ($PY: torch.cuda.is_available() is not True on this machine); run it on a GPU machine, see docs/cluster.md 'GPU check'" >&2
  exit 2
fi

OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
DATA="$WORK/data"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
: >"$WORK/parts.tsv"
export PY WORK DATA OUT_DIR ROOT
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# --- wheels the image lacks (make gpu-kit) --------------------------------------------------------
SITE="$WORK/site"
if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl >>"$LOG" 2>&1; then
    log "wheel install failed (see above); the parts run with what the image has"
  fi
else
  log "no .whl/*.whl (run 'make gpu-kit' before sending the tree): the image's packages only"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - >"$WORK/env.json" 2>>"$LOG" <<'EOF' || log "environment probe failed"
import importlib, json, platform, subprocess
import torch
env = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
       "capability": list(torch.cuda.get_device_capability(0)),
       "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
for mod in ("megatron.core", "transformer_engine", "apex", "transformers", "editdistance",
            "sentencepiece", "triton"):
    try:
        m = importlib.import_module(mod)
        env[mod] = getattr(m, "__version__", "present")
    except Exception as e:
        env[mod] = f"missing ({type(e).__name__})"
try:
    env["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    env["nvidia_smi"] = f"unavailable ({type(e).__name__})"
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                   timeout=10).stdout.strip() or "unknown"
except Exception:
    env["commit"] = "unknown"
print(json.dumps(env))
EOF
log "environment: $(cat "$WORK/env.json" 2>/dev/null)"

# --- one results file, rewritten after every part (a run cut short still leaves one) ----------
cat >"$WORK/merge.py" <<'EOF'
import json, os, sys, time
import xml.etree.ElementTree as ET
work, out = os.environ["WORK"], os.environ["OUT_DIR"]
def load(name):
    p = os.path.join(work, name)
    try:
        return json.load(open(p))
    except Exception as e:
        return {"unavailable": f"{name}: {type(e).__name__}: {e}"} if os.path.exists(p) else None
res = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "env": load("env.json"),
       "parts": {}}
for line in open(os.path.join(work, "parts.tsv")):
    f = line.rstrip("\n").split("\t")
    part = {"status": f[1], "exit": int(f[2]), "seconds": int(f[3]), "budget_s": int(f[4]),
            "log": f[5] or None}
    if len(f) > 6:
        part["reason"] = f[6]
    res["parts"][f[0]] = part
p = res["parts"]
if "gpu_tests" in p and os.path.exists(os.path.join(work, "gpu_tests.xml")):
    root = ET.parse(os.path.join(work, "gpu_tests.xml")).getroot()
    cases = []
    for tc in root.iter("testcase"):
        kind = next((c.tag for c in tc if c.tag in ("failure", "error", "skipped")), "passed")
        msg = next((c.get("message", "") for c in tc if c.tag in ("failure", "error", "skipped")), "")
        cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "result": kind,
                      "seconds": float(tc.get("time", 0)), "message": msg[:300]})
    p["gpu_tests"]["tests"] = cases
    p["gpu_tests"]["counts"] = {k: sum(c["result"] == k for c in cases)
                                for k in ("passed", "failure", "error", "skipped")}
for name, f in (("real_loop", "real_loop.json"), ("bench_losses", "bench_losses.json"),
                ("precompute", "precompute.json")):
    if name in p:
        p[name]["result"] = load(f)
json.dump(res, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
if len(sys.argv) < 2 or sys.argv[1] != "--table":
    sys.exit(0)
print(f"gpu_check: {res['env'] and res['env'].get('device')}; results in {out}/gpu_check.json")
print("| part | status | seconds | budget |")
print("|---|---|---|---|")
for k, v in p.items():
    print(f"| {k} | {v['status']}{' (' + v['reason'] + ')' if v.get('reason') else ''} | "
          f"{v['seconds']} | {v['budget_s']} |")
rl = (p.get("real_loop") or {}).get("result") or {}
for v, r in (rl.get("variants") or {}).items():
    print(f"real loop {v}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
          f"{r['tflops']:.1f} TFLOP/s, MFU {r['mfu']:.1%}, vs GEMM {r['vs_gemm']:.1%}")
if "ratio" in rl:
    print(f"real loop fusion/CE step-time ratio: {rl['ratio']:.3f}")
bl = ((p.get("bench_losses") or {}).get("result") or {}).get("rows") or {}
for m in ("mcore_ce", "fusion", "naive_fusion"):
    if m in bl and "gbps" in bl[m]:
        r = bl[m]
        print(f"loss {m}: {r['ms']:.2f} ms, peak +{r['extra_mib']:.0f} MiB, "
              f"{r['hbm_fraction_spec']:.0%} of HBM spec, {r['hbm_fraction_copy']:.0%} of copy")
EOF

# --- the parts ------------------------------------------------------------------------------------
FAILED=0

# run_part NAME BUDGET_S FUNCTION: the function runs in its own bash under `timeout` (the whole
# process group is killed at the budget); its output goes to $OUT_DIR/NAME.log
run_part() {
  local name=$1 budget=$2 fn=$3 rc=0 status t0 dt
  t0=$(date +%s)
  log "part $name: start (budget ${budget}s)"
  set +e
  timeout --kill-after=10 "$budget" bash -c "set -euo pipefail; $fn" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  set -e
  dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout
  else status=failed; fi
  [ "$status" = ok ] || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" "$budget" "$name.log" >>"$WORK/parts.tsv"
  log "part $name: $status (exit $rc, ${dt}s)"
  "$PY" "$WORK/merge.py" >>"$LOG" 2>&1 || log "writing gpu_check.json failed"
}

part_inputs() {
  "$PY" tools/make_synthetic_topk.py --out "$DATA" --seq-len 4096 --samples 16 --teachers t0,t1 \
    --k 10 --vocab 151936 --samples-per-shard 8 --hf-teacher "$DATA/hf_teacher"
}

part_gpu_tests() {
  "$PY" -m pytest -q -m gpu tests -rs --junitxml "$WORK/gpu_tests.xml"
}

part_real_loop() {
  local rc=0
  "$PY" tools/bench_gpu.py --config configs/test/gpu_check_1b.yaml --steps 20 --warmup 3 \
    --data-dir "$DATA" --work-dir "$WORK/bench" --log-dir "$WORK/trainer_logs" \
    --timeout "${GPU_CHECK_T_LAUNCH:-85}" --json "$WORK/real_loop.json" || rc=$?
  for f in "$WORK"/trainer_logs/*.log; do
    [ -e "$f" ] && { echo; echo "===== $f"; tail -n 200 "$f"; }
  done
  return $rc
}

part_bench_losses() {
  "$PY" tools/bench_losses.py --vocab 152064 --seq 4096 --dtype bf16 --device cuda --repeats 10 \
    --hbm-gbps 4800 --copy-gbps measure --json "$WORK/bench_losses.json"
}

part_precompute() {
  local tok t0 t1
  tok="$DATA/demo/pivot.model"
  t0=$(date +%s.%N)
  "$PY" tools/precompute_teacher_topk.py --backend hf --device cuda --dtype bf16 \
    --teacher-model "$DATA/hf_teacher" --teacher-tokenizer "$tok" --teacher-name hf0 \
    --data "$DATA/train.jsonl" --pivot-tokenizer "$tok" --out "$WORK/hf_topk" --seq-len 4096 \
    --batch-size 4 --samples-per-shard 8 --no-progress
  t1=$(date +%s.%N)
  "$PY" - "$tok" "$t0" "$t1" <<'EOF'
import json, os, sys
from megatron_fusion.data.sft import SFTDataset
from megatron_fusion.tokenizers import load_tokenizer
from megatron_fusion.teachers.shards import TopKReader
tok = load_tokenizer(sys.argv[1])
ds = SFTDataset(os.path.join(os.environ["DATA"], "train.jsonl"), tok, 4096)
r = TopKReader(os.path.join(os.environ["WORK"], "hf_topk"),
               expected={"teacher": "hf0", "k": 10, "dataset_hash": ds.dataset_hash,
                         "pivot_tokenizer_hash": tok.content_hash})
missing = [i for i in ds.sample_ids if i not in r]
assert not missing, f"samples without top-K: {missing[:5]}"
v, ids, m = r.batch(ds.sample_ids, 4096)
wall = float(sys.argv[3]) - float(sys.argv[2])
res = {"samples": len(r), "wall_s": wall, "pivot_tokens_per_s": len(r) * 4096 / wall,
       "aligned_fraction": float(m.float().mean()), "values_finite": bool(v[m].isfinite().all())}
assert res["values_finite"] and res["aligned_fraction"] > 0.5, res
json.dump(res, open(os.path.join(os.environ["WORK"], "precompute.json"), "w"))
print(json.dumps(res))
EOF
}

part_te_resume() {
  local tok="$DATA/demo/pivot.model" run="$WORK/te_run" i=0 spec steps
  for spec in transformer_engine:2 local:4 transformer_engine:6; do
    steps=${spec#*:}
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_fusion.train \
      --config configs/test/tiny_cpu.yaml stage=sft parallel.tp=1 train.precision=bf16 \
      "model.transformer_impl=${spec%%:*}" "train.steps=$steps" "run.dir=$run" \
      "data.train=$DATA/train.jsonl" "data.tokenizer=$tok" "data.valid=[]" model.seq_length=256 \
      logging.wandb_mode=disabled logging.progress=false checkpoint.interval=0 2>&1 | tee "$WORK/te_$i.out"
    if [ $i -gt 0 ]; then
      grep -q "resumed from .* at step $prev" "$WORK/te_$i.out" || {
        echo "te_resume: launch $i (${spec%%:*}) did not resume from step $prev"; return 1; }
    fi
    prev=$steps; i=$((i + 1))
  done
}

export -f part_inputs part_gpu_tests part_real_loop part_bench_losses part_precompute part_te_resume

run_part inputs "${GPU_CHECK_T_INPUTS:-60}" part_inputs
run_part gpu_tests "${GPU_CHECK_T_TESTS:-135}" part_gpu_tests
run_part real_loop "${GPU_CHECK_T_LOOP:-180}" part_real_loop
run_part bench_losses "${GPU_CHECK_T_LOSSES:-60}" part_bench_losses
run_part precompute "${GPU_CHECK_T_PRE:-45}" part_precompute
if "$PY" -c 'import transformer_engine' >/dev/null 2>&1; then
  run_part te_resume "${GPU_CHECK_T_TE:-60}" part_te_resume
else
  printf 'te_resume\tskipped\t0\t0\t0\t\tno TE: transformer_engine does not import\n' >>"$WORK/parts.tsv"
  log "part te_resume: skipped: no TE"
fi

"$PY" "$WORK/merge.py" --table | tee -a "$LOG" || { log "writing gpu_check.json failed"; FAILED=1; }
rm -rf "$WORK"
exit $FAILED
