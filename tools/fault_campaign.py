"""Fault campaign: faults and bad inputs counted, not assumed (issue 19).

    python -m tools.fault_campaign            # full: the figures of docs/benchmarks.md
    python -m tools.fault_campaign --quick    # a few faults + every bad input (the slow test)

Faults (each one: inject, check nothing on disk is half-written, resume):

- SIGKILL of the whole ``megatron-fusion train`` process tree (launcher, torchrun agent,
  ranks, their checkpoint workers: every descendant, SIGKILLed at once) at seeded random moments: mid-step (a random delay after a
  step's metrics line), mid-checkpoint-save (while an ``iter_*.tmp`` dir exists, seen by
  polling), in an eval step (after the save before an eval step, a random delay), at start-up;
  then a corrupted newest checkpoint (a truncated storage file) before one resume, and a full
  disk (ENOSPC from ``torch.save`` into a checkpoint, injected through a ``sitecustomize`` on
  the ranks' path). After every fault: every published ``iter_*`` passes
  ``checkpoint.checkpoint_problem`` and ``latest`` resolves. At the end the faulted run's
  metrics.jsonl values (every record of every step, perf/* excepted) and its final checkpoint's
  tensors (and per-rank RNG files) equal an uninterrupted run's, bit for bit.
- Online teachers (full run; ``--teacher-faults off`` skips): a teacher that hangs, one that
  dies and one that raises, on the real student/teacher bridge (the scenarios of
  tests/teachers/test_online_protocol.py): the student must stop naming the teacher.
- SIGKILL of ``megatron-fusion precompute-topk`` (teacher = the reference run, ``--backend
  megatron``) at random shard counts: every ``*.topk`` left validates (checksum), and the
  resumed shards equal an uninterrupted precompute's byte for byte.

Bad inputs (in-process, through the dataset classes and the CLI bodies): malformed SFT and
preference JSONL records and malformed configs / CLI values; each must give one line naming
file:line or the field (``UserError``, or argparse's ``error:`` line), or be counted in the
dataset stats (``DatasetStats``): a traceback-type exception or a silent keep fails.

The LAST line printed is the count, e.g.
``fault_campaign: faults injected 14 / survived 14; inputs tried 63 / handled 63``;
the exit code is 1 when anything failed (or a planned fault could not be injected).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Tally:
    faults: list[tuple[str, bool, str]] = field(default_factory=list)   # (what, ok, why)
    inputs: list[tuple[str, bool, str]] = field(default_factory=list)

    def fault(self, what: str, ok: bool, why: str = "") -> None:
        self.faults.append((what, ok, why))
        print(f"  fault  {'ok  ' if ok else 'FAIL'} {what}" + (f": {why}" if why else ""), flush=True)

    def input(self, what: str, ok: bool, why: str = "") -> None:
        self.inputs.append((what, ok, why))
        if not ok:
            print(f"  input  FAIL {what}: {why}", flush=True)


# --- processes --------------------------------------------------------------------------------

def _env(extra_path: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    parts = [p for p in (extra_path, str(REPO), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def _start(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """``python -m megatron_fusion.cli *argv`` in its own session (process group = its tree)."""
    f = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "megatron_fusion.cli", *argv], cwd=REPO,
                            stdout=f, stderr=subprocess.STDOUT, env=env or _env(),
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in its own process group)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process tree at once (launcher, torchrun's agent, every rank and its
    checkpoint workers); wait until none of them is left."""
    tree = [proc.pid, *_descendants(proc.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in tree[1:]) and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        return -9


def _poll_until(proc: subprocess.Popen, cond, timeout: float, every: float = 0.002) -> bool:
    """True when ``cond()`` holds before the process ends (or the timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(every)
    return False


# --- training run: what is on disk ------------------------------------------------------------

def _metric_records(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):   # the killed writer's last line
            out.append(json.loads(line))
    return out


def _max_step(run_dir: Path) -> int:
    return max((r["step"] for r in _metric_records(run_dir) if "loss/total" in r), default=0)


def validate_checkpoints(root: Path) -> str | None:
    """None when every published checkpoint under ``root`` is complete and latest resolves."""
    from megatron_fusion.checkpoint import CheckpointError, checkpoint_problem, latest_checkpoint

    if not root.exists():
        return None
    for d in sorted(root.glob("iter_*")):
        if d.name.endswith(".tmp"):
            continue
        problem = checkpoint_problem(d)
        if problem:
            return f"{d}: {problem}"
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            latest_checkpoint(root)
    except CheckpointError as e:
        return str(e)
    if err.getvalue():
        return f"latest is not the newest complete checkpoint: {err.getvalue().strip()}"
    return None


def _checkpoint_tensors(path: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(path), f"{d}/x.pt")
        out = torch.load(f"{d}/x.pt", weights_only=False)
    for rng in sorted((path / "rng").glob("*.pt")):
        out[f"rng/{rng.name}"] = torch.load(rng, weights_only=False)
    return out


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def compare_runs(ref: Path, run: Path) -> str | None:
    """None when ``run`` equals ``ref`` bit for bit (metrics values, final checkpoint)."""
    from megatron_fusion.checkpoint import latest_checkpoint

    want: dict[tuple[int, str], float] = {}
    for r in _metric_records(ref):
        for k, v in r.items():
            if k != "step" and not k.startswith("perf/"):
                want.setdefault((r["step"], k), v)
    seen = set()
    for r in _metric_records(run):
        for k, v in r.items():
            if k == "step" or k.startswith("perf/"):
                continue
            key = (r["step"], k)
            if key in want:
                seen.add(key)
                if v != want[key]:
                    return f"metrics.jsonl step {key[0]} {k}: {v!r} != uninterrupted {want[key]!r}"
            elif not k.startswith("eval/"):   # a resume logs an extra eval_before; nothing else
                return f"metrics.jsonl step {key[0]} {k}: not in the uninterrupted run"
    if seen != set(want):
        return f"metrics.jsonl lacks {sorted(set(want) - seen)[:3]}"
    a, b = latest_checkpoint(ref / "checkpoints"), latest_checkpoint(run / "checkpoints")
    if a is None or b is None or a.name != b.name:
        return f"final checkpoints differ: {a} vs {b}"
    ta, tb = _checkpoint_tensors(a), _checkpoint_tensors(b)
    if ta.keys() != tb.keys():
        return f"checkpoint keys differ: {sorted(set(ta) ^ set(tb))[:3]}"
    for k in ta:
        if not _equal(ta[k], tb[k]):
            return f"{b}: {k} differs from the uninterrupted run's"
    meta_a = json.loads((a / "meta.json").read_text())
    meta_b = json.loads((b / "meta.json").read_text())
    if meta_a != meta_b:
        return f"{b}/meta.json differs: {meta_b} vs {meta_a}"
    return None


# --- part 1: kills during training ------------------------------------------------------------

ENOSPC_HOOK = '''
import os
_step = os.environ.get("FAULT_ENOSPC_STEP")
if _step and "LOCAL_RANK" in os.environ:
    import errno
    import torch
    _save = torch.save
    def _full_disk_save(obj, f, *a, **k):
        if f"iter_{int(_step):07d}.tmp" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(f))
        return _save(obj, f, *a, **k)
    torch.save = _full_disk_save
'''


def train_campaign(work: Path, data: dict, tally: Tally, *, rng: random.Random, kills: int,
                   steps: int, nproc: int, timeout: float) -> Path:
    common = ["--config", "configs/test/tiny_cpu.yaml", "--nproc", str(nproc),
              f"parallel.tp={nproc}", f"train.steps={steps}", "checkpoint.interval=1",
              "train.eval_interval=2", "train.eval_batches=4", "logging.wandb_mode=disabled",
              "logging.progress=false", f"data.train={data['train']}",
              f"data.valid=[{data['valid_arith']}]", f"data.tokenizer={data['pivot_tokenizer']}"]
    ref, run = work / "train_ref", work / "train_faulted"
    t0 = time.monotonic()
    proc = _start(["train", *common, f"run.dir={ref}"], work / "train_ref.log")
    if _wait(proc, timeout) != 0:
        raise SystemExit(f"fault_campaign: the uninterrupted run failed, see {work / 'train_ref.log'}")
    print(f"  reference run: {steps} steps in {time.monotonic() - t0:.1f}s", flush=True)

    kinds = ["mid-save", "mid-step", "eval step", "start-up"]
    plan = [kinds[i % len(kinds)] for i in range(kills)]
    rng.shuffle(plan)
    log = work / "train_faulted.log"
    argv = ["train", *common, f"run.dir={run}"]
    corrupt_at = len(plan) // 2            # corrupt the newest checkpoint after this kill
    enospc_done = kills < 3                # --quick: no full-disk fault
    injected: list[str] = []
    corrupted: tuple[Path, int] | None = None    # (the dir, the log's length then)
    launches = 0
    while True:
        done = _max_step(run)
        if done >= steps and (run / "checkpoints" / "latest").exists() and not plan:
            break
        launches += 1
        if launches > 4 * kills + 10:
            tally.fault("training campaign", False, "too many relaunches")
            break
        env = None
        if not enospc_done and len(injected) >= 2 and done + 2 < steps:
            # full disk at the next save: the run fails, the last good checkpoint stays
            hook = work / "enospc_hook"
            hook.mkdir(exist_ok=True)
            (hook / "sitecustomize.py").write_text(ENOSPC_HOOK)
            env = _env(str(hook))
            env["FAULT_ENOSPC_STEP"] = str(done + 2)
            before = len(log.read_text(errors="replace"))
            proc = _start(argv, log, env)
            t_start = time.monotonic()
            code = _wait(proc, min(timeout, 240.0))
            hung = code == -9
            text = log.read_text(errors="replace")[before:]
            bad = validate_checkpoints(run / "checkpoints")
            ok = code not in (0, -9) and bad is None and "No space left on device" in text
            why = bad or ("the run did not fail" if code == 0 else
                          f"the launch hung (no exit {time.monotonic() - t_start:.0f}s after the "
                          "injected ENOSPC; killed)" if hung else
                          "" if ok else "no 'No space left on device' in the log")
            tally.fault(f"full disk (ENOSPC) at the step-{done + 2} save", ok, why)
            enospc_done = True
            continue
        proc = _start(argv, log)
        if not plan:
            if _wait(proc, timeout) != 0:
                tally.fault("final resume", False, f"exit code {proc.returncode}, see {log}")
                break
            continue
        kind = plan[0]
        target = min(done + 1 + rng.randint(0, 1), max(done + 1, steps - 1))
        ck = run / "checkpoints"
        if kind == "mid-save":
            hit = _poll_until(proc, lambda: any(
                int(p.name[5:12]) >= target for p in ck.glob("iter_*.tmp")), timeout, 0.001)
            time.sleep(rng.uniform(0, 0.01))
            observed = hit and any(ck.glob("iter_*.tmp"))
        elif kind == "mid-step":
            hit = _poll_until(proc, lambda: _max_step(run) >= target, timeout, 0.01)
            time.sleep(rng.uniform(0, 0.15))
            observed = hit
        elif kind == "eval step":   # the save before an eval step (even step), then a delay
            odd = target if target % 2 else target + 1
            hit = _poll_until(proc, lambda: (ck / "latest").exists()
                              and (ck / "latest").read_text().strip() == f"iter_{odd:07d}",
                              timeout, 0.005)
            time.sleep(rng.uniform(0.05, 0.3))
            observed = hit
        else:                        # start-up: model build, checkpoint load, eval before
            hit = True
            time.sleep(rng.uniform(2.0, 12.0))
            observed = proc.poll() is None and _max_step(run) == done
        alive = proc.poll() is None
        _kill_tree(proc)
        if not (alive and observed):
            # the moment was missed (the run finished or moved on): not a fault; try again
            if proc.returncode == 0 and _max_step(run) >= steps:
                tally.fault(f"SIGKILL {kind}", False, "could not be injected before the end")
                plan.pop(0)
            continue
        plan.pop(0)
        moment = f"SIGKILL {kind} (step {_max_step(run)} logged)"
        bad = validate_checkpoints(ck)
        if bad is None and len(injected) == corrupt_at:
            from megatron_fusion.checkpoint import latest_checkpoint

            newest = latest_checkpoint(ck)
            if newest is not None and len(list(ck.glob("iter_*[0-9]"))) >= 2:
                # truncate its biggest storage file: the next launches must fall back, loudly
                f = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
                corrupted = (newest, len(log.read_text(errors="replace")))
                moment += f", then {newest.name} corrupted"
        injected.append(moment)
        tally.fault(moment, bad is None, bad or "")
    if corrupted is not None:
        said = log.read_text(errors="replace")[corrupted[1]:]
        ok = f"warning: checkpoint {corrupted[0]} is corrupted" in said
        tally.fault(f"corrupted newest checkpoint {corrupted[0].name}: resume fell back to the "
                    "previous one, loudly", ok, "" if ok else "no fallback warning in the log")
    elif kills >= 2:
        tally.fault("corrupted newest checkpoint", False, "could not be injected")
    diff = compare_runs(ref, run)
    tally.fault(f"faulted run == uninterrupted run ({len(injected)} kills, {launches} launches)",
                diff is None, diff or "")
    return ref


# --- part 2: kills during top-K precompute ----------------------------------------------------

def precompute_campaign(work: Path, data: dict, teacher_run: Path, tally: Tally, *,
                        rng: random.Random, kills: int, timeout: float) -> None:
    from megatron_fusion.teachers.shards import TopKReader

    def argv(out: Path) -> list[str]:
        return ["precompute-topk", "--backend", "megatron", "--checkpoint", str(teacher_run),
                "--teacher-name", "self", "--data", data["train"], "--pivot-tokenizer",
                data["pivot_tokenizer"], "--seq-len", "128", "--out", str(out),
                "--samples-per-shard", "2", "--batch-size", "2", "--no-progress"]

    ref, out = work / "topk_ref", work / "topk_faulted"
    proc = _start(argv(ref), work / "topk_ref.log")
    if _wait(proc, timeout) != 0:
        raise SystemExit(f"fault_campaign: the uninterrupted precompute failed, see {work / 'topk_ref.log'}")
    n_ref = len(list(ref.glob("*.topk")))
    targets = sorted(rng.sample(range(1, n_ref), min(kills, n_ref - 1)))
    for target in targets:
        target = max(target, len(list(out.glob("*.topk"))) + 1)   # a kill may overshoot
        if target >= n_ref:
            tally.fault("SIGKILL precompute-topk", False, "no shard left to kill before")
            continue
        proc = _start(argv(out), work / "topk_faulted.log")
        hit = _poll_until(proc, lambda: len(list(out.glob("*.topk"))) >= target, timeout, 0.002)
        time.sleep(rng.uniform(0, 0.05))
        alive = proc.poll() is None
        _kill_tree(proc)
        have = sorted(out.glob("*.topk"))
        bad = ""
        for p in have:
            try:
                TopKReader(p)
            except Exception as e:  # any unreadable shard is the failure counted here
                bad = f"{p}: {type(e).__name__}: {e}"
                break
        what = f"SIGKILL precompute-topk after {len(have)}/{n_ref} shards"
        tally.fault(what, hit and alive and not bad, bad or ("" if alive else "finished first"))
    proc = _start(argv(out), work / "topk_faulted.log")
    code = _wait(proc, timeout)
    diff = [p.name for p in sorted(ref.glob("*.topk"))
            if not (out / p.name).exists() or (out / p.name).read_bytes() != p.read_bytes()]
    extra = sorted({p.name for p in out.iterdir()} - {p.name for p in ref.iterdir()})
    tally.fault(f"resumed precompute == uninterrupted ({n_ref} shards)", code == 0 and not diff
                and not extra, f"exit {code}, differing {diff[:3]}, extra files {extra[:3]}"
                if code or diff or extra else "")


# --- part 3: bad inputs -----------------------------------------------------------------------

GOOD_SFT = [{"prompt": "1+1=", "response": "2"}, {"prompt": "abc reversed:", "response": "cba"}]
GOOD_PREF = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
             {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]


def _j(x) -> bytes:
    return json.dumps(x, ensure_ascii=False).encode()


def bad_sft_records() -> list[tuple[str, bytes, str]]:
    """(name, the bad line, "error" | "counted") for SFT files."""
    chat = lambda msgs: _j({"messages": msgs})  # noqa: E731
    return [
        ("invalid JSON: truncated object", b'{"prompt": "a", "response": ', "error"),
        ("invalid JSON: trailing comma", b'{"prompt": "a", "response": "b",}', "error"),
        ("invalid JSON: single quotes", b"{'prompt': 'a', 'response': 'b'}", "error"),
        ("invalid JSON: bare text", b"hello world", "error"),
        ("invalid JSON: two objects on a line", b'{"prompt":"a","response":"b"}{"x":1}', "error"),
        ("invalid UTF-8 bytes", b'{"prompt": "\xff\xfe", "response": "b"}', "error"),
        ("invalid UTF-8: lone continuation byte", b'{"prompt": "a\x80", "response": "b"}', "error"),
        ("a JSON array, not an object", _j(["a", "b"]), "error"),
        ("a JSON string, not an object", _j("prompt"), "error"),
        ("a JSON number", b"42", "error"),
        ("JSON null", b"null", "error"),
        ("missing response", _j({"prompt": "a"}), "error"),
        ("missing prompt", _j({"response": "a"}), "error"),
        ("empty object", b"{}", "error"),
        ("misspelled keys", _j({"promt": "a", "respone": "b"}), "error"),
        ("prompt is a number", _j({"prompt": 3, "response": "b"}), "error"),
        ("response is a list", _j({"prompt": "a", "response": ["b"]}), "error"),
        ("response is null", _j({"prompt": "a", "response": None}), "error"),
        ("response is an object", _j({"prompt": "a", "response": {"text": "b"}}), "error"),
        ("response is a bool", _j({"prompt": "a", "response": True}), "error"),
        ("response is NaN", b'{"prompt": "a", "response": NaN}', "error"),
        ("empty response", _j({"prompt": "a", "response": ""}), "counted"),
        ("blank response", _j({"prompt": "a", "response": "   \n\t"}), "counted"),
        ("empty prompt and response", _j({"prompt": "", "response": ""}), "counted"),
        ("messages is a string", _j({"messages": "hi"}), "error"),
        ("messages is an object", _j({"messages": {"role": "user"}}), "error"),
        ("messages item is a string", chat(["hi"]), "error"),
        ("message content is a number", chat([{"role": "user", "content": 1}]), "error"),
        ("message content is a list", chat([{"role": "user", "content": [{"text": "a"}]}]), "error"),
        ("message content is null", chat([{"role": "assistant", "content": None}]), "error"),
        ("message without content", chat([{"role": "user"}]), "error"),
        ("message without role", chat([{"content": "a"}]), "error"),
        ("message role is a number", chat([{"role": 1, "content": "a"}]), "error"),
        ("unknown role", chat([{"role": "wizard", "content": "a"},
                               {"role": "assistant", "content": "b"}]), "error"),
        ("role with the wrong case", chat([{"role": "User", "content": "a"},
                                           {"role": "assistant", "content": "b"}]), "error"),
        ("messages without an assistant turn", chat([{"role": "user", "content": "a"}]), "counted"),
        ("empty messages list", chat([]), "counted"),
        ("empty assistant turn", chat([{"role": "user", "content": "a"},
                                       {"role": "assistant", "content": ""}]), "counted"),
        ("huge line (400 KB prompt): response cut away by truncation",
         _j({"prompt": "x " * 200_000, "response": "b"}), "counted"),
        ("huge response (200 KB): truncated, counted", _j({"prompt": "a", "response": "y " * 100_000}),
         "counted"),
        ("no chat template: messages with a tokenizer without one",
         chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "error"),
        ("NUL bytes in the text", _j({"prompt": "a\x00b", "response": "c\x00"}), "kept"),
    ]


def bad_pref_records() -> list[tuple[str, bytes, str]]:
    return [
        ("pref: invalid JSON", b'{"prompt": "a", "chosen": "b", "rejected": ', "error"),
        ("pref: invalid UTF-8", b'{"prompt": "a", "chosen": "\xc3\x28", "rejected": "c"}', "error"),
        ("pref: not an object", _j([1, 2, 3]), "error"),
        ("pref: missing rejected", _j({"prompt": "a", "chosen": "b"}), "error"),
        ("pref: missing chosen", _j({"prompt": "a", "rejected": "b"}), "error"),
        ("pref: missing prompt", _j({"chosen": "a", "rejected": "b"}), "error"),
        ("pref: SFT record in a preference file", _j({"prompt": "a", "response": "b"}), "error"),
        ("pref: chosen is a number", _j({"prompt": "a", "chosen": 1, "rejected": "b"}), "error"),
        ("pref: rejected is null", _j({"prompt": "a", "chosen": "b", "rejected": None}), "error"),
        ("pref: prompt is a list", _j({"prompt": ["a"], "chosen": "b", "rejected": "c"}), "error"),
        ("pref: chosen is chat messages", _j({"prompt": "a", "chosen": [{"role": "assistant",
                                                                          "content": "b"}],
                                               "rejected": "c"}), "error"),
        ("pref: empty chosen", _j({"prompt": "a", "chosen": "", "rejected": "c"}), "counted"),
        ("pref: blank rejected", _j({"prompt": "a", "chosen": "b", "rejected": "  "}), "counted"),
        ("pref: huge prompt, responses cut away",
         _j({"prompt": "x " * 200_000, "chosen": "b", "rejected": "c"}), "counted"),
    ]


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _one_line_error(e: BaseException, path: Path, line_no: int) -> str | None:
    """None when ``e`` is a one-line user error naming ``path:line_no``."""
    from megatron_fusion.errors import user_facing

    msg = str(e)
    if not user_facing(e):
        return f"{type(e).__name__} (a traceback): {msg[:120]}"
    if "\n" in msg.strip():
        return f"more than one line: {msg[:120]!r}"
    if not msg.startswith(f"{path}:{line_no}:"):
        return f"does not start with {path.name}:{line_no}: {msg[:120]!r}"
    return None


def check_bad_records(work: Path, data: dict, tally: Tally) -> None:
    from megatron_fusion.data.preference import PreferenceDataset
    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.tokenizers import load_tokenizer

    tok = load_tokenizer(data["pivot_tokenizer"])
    chat_tok = load_tokenizer(data["pivot_tokenizer"])
    chat_tok.chat_template = CHAT_TEMPLATE
    d = work / "bad_records"
    d.mkdir(exist_ok=True)
    cases = [(SFTDataset, GOOD_SFT, c) for c in bad_sft_records()]
    cases += [(PreferenceDataset, GOOD_PREF, c) for c in bad_pref_records()]
    for i, (cls, good, (name, line, expect)) in enumerate(cases):
        path = d / f"case_{i:03d}.jsonl"
        path.write_bytes(_j(good[0]) + b"\n" + _j(good[1]) + b"\n" + line + b"\n")
        why = None
        try:
            ds = cls(path, tok if name.startswith("no chat template") else chat_tok, 64)
        except Exception as e:  # the campaign counts whatever comes out
            why = _one_line_error(e, path, 3) if expect == "error" else (
                f"raised {type(e).__name__} where it should be counted: {str(e)[:100]}")
        else:
            s = ds.stats
            counted = s.records == 3 and (s.kept == 2 and any(":3:" in x for x in s.details)
                                          or s.kept == 3 and s.truncated >= 1)
            if expect == "kept":
                why = None if s.kept == 3 else f"not kept: {s.as_dict()}"
            elif expect == "counted" and not counted:
                why = f"not counted in the stats: {s.as_dict()}"
            elif expect == "error":
                why = (f"accepted silently ({s.as_dict()})" if not counted
                       else None)   # counted instead of an error: still not silent
        tally.input(name, why is None, why or "")


def _cli_case(argv: list[str]) -> tuple[int | None, str, BaseException | None]:
    from megatron_fusion import cli

    err = io.StringIO()
    code, exc = None, None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # counted: a traceback-type failure
            exc = e
    return code, err.getvalue(), exc


def check_bad_configs(work: Path, data: dict, tally: Tally) -> None:
    d = work / "bad_configs"
    d.mkdir(exist_ok=True)
    base = ["train", "--config", "configs/test/tiny_cpu.yaml", "--nproc", "1", "parallel.tp=1",
            f"run.dir={d / 'run'}"]
    files = {
        "yaml syntax error": "stage: sft\nmodel: [unclosed\n",
        "yaml top level is a list": "- stage: sft\n",
        "unknown top-level section": "stage: sft\nmodle:\n  num_layers: 2\n",
        "unknown model field": "stage: sft\nmodel:\n  num_layer: 2\n",
        "stage unknown": "stage: pretrain\n",
        "section is a scalar": "stage: sft\nmodel: 3\n",
    }
    cases = []
    for name, text in files.items():
        p = d / (name.replace(" ", "_") + ".yaml")
        p.write_text(text)
        cases.append((f"config file: {name}", ["train", "--config", str(p), "--nproc", "1"]))
    cases += [
        ("config file missing", ["train", "--config", str(d / "nope.yaml")]),
        ("override without '='", base + ["train.steps"]),
        ("override of an unknown key", base + ["train.stepz=3"]),
        ("override of an unknown section", base + ["trian.steps=3"]),
        ("steps is a word", base + ["train.steps=many"]),
        ("steps negative", base + ["train.steps=-1"]),
        ("lr negative", base + ["optim.lr=-1"]),
        ("lr is a list", base + ["optim.lr=[1,2]"]),
        ("micro_batch zero", base + ["train.micro_batch=0"]),
        ("global_batch not a multiple of micro_batch", base + ["train.global_batch=7"]),
        ("tp does not divide heads", base + ["parallel.tp=3", "--nproc", "3"]),
        ("precision unknown", base + ["train.precision=fp8x"]),
        ("seq_length zero", base + ["model.seq_length=0"]),
        ("hidden_size not divisible by heads", base + ["model.hidden_size=65"]),
        ("--nproc is a word", ["train", "--config", "configs/test/tiny_cpu.yaml", "--nproc", "two"]),
        ("--nproc does not fit the layout", ["train", "--config", "configs/test/tiny_cpu.yaml",
                                              "--nproc", "3"]),
        ("precompute-topk: --seq-len is a word", ["precompute-topk", "--data", data["train"],
                                                   "--pivot-tokenizer", data["pivot_tokenizer"],
                                                   "--teacher-name", "t", "--out", str(d / "o"),
                                                   "--seq-len", "long"]),
        ("precompute-topk: --alignment unknown", ["precompute-topk", "--data", data["train"],
                                                  "--pivot-tokenizer", data["pivot_tokenizer"],
                                                  "--teacher-name", "t", "--out", str(d / "o"),
                                                  "--seq-len", "64", "--alignment", "fuzzy"]),
        ("precompute-topk: missing --out", ["precompute-topk", "--data", data["train"],
                                            "--pivot-tokenizer", data["pivot_tokenizer"],
                                            "--teacher-name", "t", "--seq-len", "64"]),
    ]
    for name, argv in cases:
        code, err, exc = _cli_case(argv)
        lines = [x for x in err.splitlines() if x.strip()]
        if exc is not None:
            why = f"{type(exc).__name__} (a traceback): {str(exc)[:120]}"
        elif code in (0, None):
            why = "accepted"
        elif "Traceback" in err:
            why = "printed a traceback"
        elif not lines:
            why = "failed without a message"
        else:
            last = lines[-1]
            # one line: ours ("config error: field: ...") or argparse's usage + "error:" line
            ok = last.startswith("config error: ") or ": error: " in last
            why = None if ok else f"unclear message: {last[:120]!r}"
        tally.input(name, why is None, why or "")


# --- main -------------------------------------------------------------------------------------

TEACHER_FAULTS = {
    "an online teacher that hangs: the student stops within fuse.timeout_s naming it":
        "test_hung_teacher_times_out_with_its_name_and_the_setting",
    "an online teacher rank that dies: the student names its launch rank":
        "test_dead_teacher_without_message_names_its_rank",
    "an online teacher that raises: the student reports its message":
        "test_teacher_error_message_is_reported",
}


def teacher_campaign(tally: Tally, timeout: float) -> None:
    """Online-teacher faults on the real student/teacher bridge (2 gloo ranks, no models): the
    scenarios of tests/teachers/test_online_protocol.py, run and counted here. A SIGKILLed teacher
    rank inside a whole training launch is tests/teachers/test_online.py's (named by the launcher)."""
    root = Path(__file__).resolve().parents[1]
    for what, test in TEACHER_FAULTS.items():
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"tests/teachers/test_online_protocol.py::{test}"], cwd=root,
                           capture_output=True, text=True, timeout=timeout)
        last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
        tally.fault(what, p.returncode == 0, "" if p.returncode == 0 else last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fault_campaign", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two training kills and the bad inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=None, help="training kills (default 10, quick 2)")
    ap.add_argument("--precompute-kills", type=int, default=None, help="default 4, quick 0")
    ap.add_argument("--nproc", type=int, default=None, help="training ranks (default 2, quick 1)")
    ap.add_argument("--teacher-faults", choices=["on", "off"], default=None,
                    help="online-teacher hang / death / error (default on, quick off)")
    ap.add_argument("--workdir", default=None, help="default: a temp dir, removed at the end")
    ap.add_argument("--timeout", type=float, default=600.0, help="per launch, seconds")
    args = ap.parse_args(argv)
    kills = args.kills if args.kills is not None else (2 if args.quick else 10)
    pre_kills = args.precompute_kills if args.precompute_kills is not None else (0 if args.quick else 4)
    nproc = args.nproc or (1 if args.quick else 2)
    steps = 6 if args.quick else 16
    rng = random.Random(args.seed)
    tally = Tally()
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fault_campaign_")))
        work.mkdir(parents=True, exist_ok=True)
        from megatron_fusion.data.tiny import make_demo_data

        data = {k: str(v) for k, v in make_demo_data(work / "data", n_train=48, n_valid=16).items()}
        print("bad inputs", flush=True)
        check_bad_records(work, data, tally)
        check_bad_configs(work, data, tally)
        print(f"faults: training ({kills} kills, {nproc} rank(s), {steps} steps)", flush=True)
        teacher = train_campaign(work, data, tally, rng=rng, kills=kills, steps=steps, nproc=nproc,
                                 timeout=args.timeout)
        if (args.teacher_faults or ("off" if args.quick else "on")) == "on":
            print("faults: online teachers", flush=True)
            teacher_campaign(tally, args.timeout)
        if pre_kills:
            print(f"faults: top-K precompute ({pre_kills} kills)", flush=True)
            precompute_campaign(work, data, teacher, tally, rng=rng, kills=pre_kills,
                                timeout=args.timeout)
    nf, sf = len(tally.faults), sum(ok for _, ok, _ in tally.faults)
    ni, si = len(tally.inputs), sum(ok for _, ok, _ in tally.inputs)
    print(f"wall time {time.monotonic() - t0:.1f}s", flush=True)
    print(f"fault_campaign: faults injected {nf} / survived {sf}; inputs tried {ni} / handled {si}",
          flush=True)
    return 0 if nf == sf and ni == si else 1


if __name__ == "__main__":
    sys.exit(main())
