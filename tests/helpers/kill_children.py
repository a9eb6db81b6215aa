"""Child processes for the SIGKILL tests (tests/teachers/test_shard_kill.py,
tests/trainer/test_checkpoint_kill.py): ``python -m tests.helpers.kill_children MODE JSON``.

Each child prints one line (flushed) at the moments the parent aims its SIGKILL at:
``closing G`` just before a TopKWriter writes generation G, ``saving N`` just before
dist_checkpointing saves step N (a test-side wrapper; the product code is unchanged).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


# --- shards ---------------------------------------------------------------------------------

def shard_samples(gen: int, n: int, seq: int, k: int):
    """Deterministic content of generation ``gen``: (sample_id, values, ids, mask) per sample."""
    g = torch.Generator().manual_seed(gen)
    for sid in range(n):
        values = torch.randn(seq, k, generator=g).sort(dim=-1, descending=True).values
        ids = torch.randint(0, 30000, (seq, k), generator=g)
        mask = torch.rand(seq, generator=g) < 0.8
        yield sid, values, ids, mask


def shard_header(gen: int, k: int):
    from megatron_fusion.teachers.shards import TopKHeader

    return TopKHeader(teacher="t", teacher_tokenizer_hash="tt", pivot_tokenizer_hash="pp", k=k,
                      dataset_hash="dd", meta={"gen": gen})


def write_shards(path: str, n: int, seq: int, k: int, gens: int, pause_mid_write: bool = False) -> None:
    """Rewrite ``path`` with generations 1..gens (each a large shard), announcing each close.
    ``pause_mid_write``: the last generation's write stops half way (``mid-write`` line, then a
    long sleep), so a kill on that line lands inside the write on any machine, however fast."""
    from megatron_fusion.teachers import shards
    from megatron_fusion.teachers.shards import TopKWriter

    if pause_mid_write:
        real = shards.atomic_write_bytes

        def paused(target, chunks):
            chunks = list(chunks)

            def gen_chunks():
                for i, c in enumerate(chunks):
                    if i == len(chunks) // 2 and f"closing {gens}" in announced:
                        print("mid-write", flush=True)
                        time.sleep(120)
                    yield c
            real(target, gen_chunks())

        shards.atomic_write_bytes = paused
    announced: list[str] = []
    for gen in range(1, gens + 1):
        w = TopKWriter(path, shard_header(gen, k))
        for sid, values, ids, mask in shard_samples(gen, n, seq, k):
            w.add(sid, values, ids, mask, teacher_ce=float(gen))
        print(f"closing {gen}", flush=True)
        announced.append(f"closing {gen}")
        w.close()
        print(f"done {gen}", flush=True)


# --- precompute -----------------------------------------------------------------------------

def precompute_inputs(train: str, tokenizer: str, seq: int = 64):
    """The demo SFT set and a tiny seeded HF-Llama teacher with the pivot tokenizer."""
    import transformers

    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.teachers.backends import HFTeacherBackend
    from megatron_fusion.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=256)
    return SFTDataset(train, tok, seq), tok, HFTeacherBackend(model=transformers.LlamaForCausalLM(cfg))


def precompute(train: str, tokenizer: str, out_dir: str, per_shard: int) -> dict:
    from megatron_fusion.teachers.precompute import precompute_teacher_topk

    ds, tok, backend = precompute_inputs(train, tokenizer)
    return precompute_teacher_topk(ds, tok, backend, out_dir, teacher="tk", progress=False,
                                   samples_per_shard=per_shard, batch_size=4, threshold=0.0)


# --- training -------------------------------------------------------------------------------

def train_announcing_saves(overrides: list[str]) -> None:
    from megatron.core import dist_checkpointing

    from megatron_fusion.config import load_config
    from megatron_fusion.parallel import init_distributed
    from megatron_fusion.train import train

    real_save = dist_checkpointing.save

    def save(state, path, *a, **kw):
        print(f"saving {Path(path).name.split('.')[0][5:].lstrip('0') or 0}", flush=True)
        return real_save(state, path, *a, **kw)

    dist_checkpointing.save = save
    init_distributed()
    torch.set_num_threads(1)
    train(load_config(None, overrides))


# --- parent side ----------------------------------------------------------------------------

def start(mode: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.kill_children", mode,
                             json.dumps(kw)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def kill_after(proc: subprocess.Popen, line_ok, delay_s: float, timeout_s: float = 240.0) -> list[str]:
    """Read the child's lines until ``line_ok(line)``, sleep ``delay_s``, SIGKILL it; return the
    lines seen. Fails if the child exits before (its work was too short to be killed)."""
    seen, t_end = [], time.monotonic() + timeout_s
    while True:
        r, _, _ = select.select([proc.stdout], [], [], max(t_end - time.monotonic(), 0))
        if not r:
            proc.kill()
            raise TimeoutError(f"child gave no '{line_ok}' line in {timeout_s}s: {seen}")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited (rc {proc.wait()}) before the kill point: {seen}")
        seen.append(line.strip())
        if line_ok(line.strip()):
            break
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return seen


def kill_when(proc: subprocess.Popen, ready, delay_s: float, timeout_s: float = 240.0) -> None:
    """Poll ``ready()`` (e.g. a first shard on disk), sleep ``delay_s``, SIGKILL the child."""
    t_end = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"child exited (rc {proc.returncode}) before the kill point")
        if time.monotonic() > t_end:
            proc.kill()
            raise TimeoutError(f"kill point not reached in {timeout_s}s")
        time.sleep(0.01)
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def run_concurrently(jobs) -> list:
    """Run each ``job()`` (start a child + its kill) in its own thread; return their results."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as ex:
        return [f.result() for f in [ex.submit(j) for j in jobs]]


def main(argv: list[str]) -> None:
    mode, kw = argv[0], json.loads(argv[1])
    if mode == "shards":
        write_shards(**kw)
    elif mode == "precompute":
        s = precompute(**kw)
        print(f"finished {s['skipped_shards']}", flush=True)
    elif mode == "train":
        train_announcing_saves(kw["overrides"])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
