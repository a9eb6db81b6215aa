"""Benchmark the fusion losses: time and peak memory of forward+backward, as ratios taken in one run.

Compared on the same logits ``[batch, seq, vocab]`` (TP = 1, one process):
  mcore_ce        megatron-core ``tensor_parallel.vocab_parallel_cross_entropy`` (the baseline)
  ce              ``-token_logprobs`` (ours; the trainer's CE)
  std_topk        ``standardized_topk`` alone (the shared student top-K)
  ce_topk         ``cross_entropy_and_topk`` alone: CE + standardised top-K in one Function
  uld, gld        each loss on its own (each computes its own top-K)
  uld+gld         both losses on one shared top-K
  fusion          ce + uld + gld from ``cross_entropy_and_topk`` (how the fusion stage calls them:
                  one shard-sized gradient; vs mcore_ce: PERF target 1, loss part only)
  hybrid          ce + hybrid + gld from ``cross_entropy_topk_and_match``, as the fusion stage
                  calls them with ``fuse.loss: hybrid`` (one teacher, grouped form, tail bucket on;
                  70 % of the teacher's top-K entries matched): the same one Function, two more
                  all-reduced scalars per token, the matched columns gathered and scattered
  fusion_separate ce (``token_logprobs``) + uld + gld on one shared ``standardized_topk``: two
                  autograd Functions, two shard-sized gradients (the path before the fused one)
  naive_uld+gld   a gather-the-full-vocab implementation: fp32 copy of all logits, full z-score
                  tensor, torch.topk, autograd keeps the full-vocab intermediates
  naive_fusion    naive CE (fp32 log_softmax) + naive ULD/GLD

Time: best of ``--repeats`` runs after a warm-up (noise from other work on a shared machine only
adds time), methods interleaved so drift hits all alike.
Peak memory, CPU: a fresh subprocess warms every method up, then for each one resets the kernel's
peak-RSS counter (VmHWM, via ``/proc/self/clear_refs``), runs forward+backward and reads the peak
above the RSS before it; glibc is told to mmap large blocks so freed memory leaves RSS at once. (tracemalloc does not see torch's
allocations.) GPU: ``torch.cuda.max_memory_allocated`` above the inputs, plus the fraction of HBM
bandwidth for the bytes a loss must move (read logits in forward and backward, write the gradient),
against the datasheet (``--hbm-gbps``, default the H200's 4.8 TB/s) and against a device-to-device
copy measured in the same run (``--copy-gbps``; ``measure`` by default, about 4.3 TB/s on this
workplace's H200, bytes read + written).
Extra memory is also given in fp32 copies of the logits (``N * V * 4`` bytes): PERF target 2.

    .venv/bin/python tools/bench_losses.py                       # CPU defaults, ~1 min
    python tools/bench_losses.py --vocab 152064 --seq 4096 --dtype bf16 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

METHODS = ["mcore_ce", "ce", "std_topk", "ce_topk", "uld", "gld", "uld+gld", "fusion", "hybrid",
           "fusion_separate", "naive_uld+gld", "naive_fusion"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available, else cpu; cuda without a GPU is an error")
    p.add_argument("--hbm-gbps", type=float, default=4800.0,
                   help="datasheet HBM GB/s (H200: 4800; H100 SXM: 3350)")
    p.add_argument("--copy-gbps", default="measure",
                   help="measured copy GB/s (read + write) to compare with, or 'measure' (CUDA)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: steadier ratios on a shared machine)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_memory-of", dest="memory_of", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setup_megatron():
    """A world of one with Megatron's TP group, so that vocab_parallel_cross_entropy runs."""
    from megatron_fusion.parallel import init_distributed, init_student_groups

    init_distributed()
    init_student_groups(tp=1)


def make_inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, s, v, k = args.batch, args.seq, args.vocab, args.k
    if device.type == "cuda":  # drawn on the GPU: at V=152k, s=4096 a CPU draw takes many seconds
        gd = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(b, s, v, generator=gd, dtype=DTYPES[args.dtype], device=device) * 2
    else:
        logits = torch.randn(b, s, v, generator=g, dtype=DTYPES[args.dtype]) * 2
    t_vals = torch.sort(torch.randn(b, s, k, generator=g) + 1, -1, descending=True).values
    t_ids = torch.randint(0, v, (b, s, k), generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = torch.ones(b, s)
    mask[:, : s // 4] = 0                       # a prompt: no distillation there
    # hybrid: the teacher's top-K log-probs (descending, mass < 1) and the pivot id of each entry,
    # distinct per position, 30 % unmatched (-1)
    t_logp = torch.log_softmax(t_vals * 2, -1) - 0.2
    base = torch.randint(0, v, (b, s, 1), generator=g)
    m_ids = (base + torch.arange(k) * (v // k)) % v
    m_ids = torch.where(torch.rand(b, s, k, generator=g) < 0.7, m_ids, -1)
    return dict(logits=logits, t_vals=t_vals.to(device), t_ids=t_ids.to(device),
                labels=labels.to(device), mask=mask.to(device), t_logp=t_logp.to(device),
                m_ids=m_ids.to(device))


def naive_topk(logits, k, eps=1e-6):
    """Gather-the-full-vocab reference (at TP=1 the gather is a no-op): full fp32 tensors."""
    z = logits.float()                                             # fp32 copy of all logits
    zhat = (z - z.mean(-1, keepdim=True)) / (z.std(-1, unbiased=False, keepdim=True) + eps)
    return torch.topk(zhat, k, dim=-1)


def build(method, inp, args):
    """Returns ``(prepare, run)``: ``run`` does forward+backward once on a fresh leaf; ``prepare``
    (untimed) restores what a method may have overwritten."""
    from megatron.core import tensor_parallel

    from megatron_fusion.losses import (HybridLossConfig, cross_entropy_and_topk,
                                        cross_entropy_topk_and_match, gld_from_topk, gld_loss,
                                        hybrid_from_outputs, standardized_topk, token_logprobs,
                                        uld_from_topk, uld_loss)
    from megatron_fusion.losses.hybrid import clean_teacher
    k, ct = args.k, args.chunk_tokens
    t_vals, t_ids, labels, mask = inp["t_vals"], inp["t_ids"], inp["labels"], inp["mask"]
    labels_sb = labels.transpose(0, 1).contiguous()

    def ours_uld_gld(x, topk):
        u, _ = uld_loss(None, t_vals, mask, k=k, student_topk=topk)
        g, _ = gld_loss(None, t_vals, t_ids, mask, k=k, student_topk=topk)
        return u + g

    def fused_fusion(x):
        out = cross_entropy_and_topk(x, labels, k, chunk_tokens=ct)
        return out.ce.sum() + ours_uld_gld(x, out.std_topk)

    hybrid_cfg = HybridLossConfig(tail_bucket=True)

    def fused_hybrid(x):    # as FuseStage.loss_func with fuse.loss=hybrid and one teacher
        p_t, _, mids = clean_teacher(inp["t_logp"], inp["m_ids"], mask)
        out = cross_entropy_topk_and_match(x, labels, k, match_ids=mids[..., None, :],
                                           match_probs=p_t[..., None, :], tail_bucket=True,
                                           chunk_tokens=ct)
        h, _ = hybrid_from_outputs(out.teacher(0), inp["t_logp"], mids, mask, config=hybrid_cfg)
        g, _ = gld_loss(None, t_vals, t_ids, mask, k=k, student_topk=out.std_topk)
        return out.ce.sum() + h + g

    def naive_uld_gld(x):
        vals, ids = naive_topk(x, k)
        u = (uld_from_topk(vals, t_vals) * mask).sum()
        return u + gld_from_topk(vals, ids, t_vals, t_ids, mask).sum()

    fns = {
        # Megatron's CE takes [s, b, v] and works IN PLACE on its input (for fp32 logits the
        # input's storage becomes the softmax and then the gradient): it gets its own copy,
        # refreshed outside the timed region, so it neither clobbers the shared logits nor pays
        # for a copy it would not make in training
        "mcore_ce": lambda x: tensor_parallel.vocab_parallel_cross_entropy(
            x, labels_sb).sum(),
        "ce": lambda x: -token_logprobs(x, labels, chunk_tokens=ct).sum(),
        "std_topk": lambda x: standardized_topk(x, k, chunk_tokens=ct)[0].sum(),
        "ce_topk": lambda x: sum(o.sum() for o in cross_entropy_and_topk(
            x, labels, k, chunk_tokens=ct)[:2]),
        "uld": lambda x: uld_loss(x, t_vals, mask, k=k, chunk_tokens=ct)[0],
        "gld": lambda x: gld_loss(x, t_vals, t_ids, mask, k=k, chunk_tokens=ct)[0],
        "uld+gld": lambda x: ours_uld_gld(x, standardized_topk(x, k, chunk_tokens=ct)),
        "fusion": fused_fusion,
        "hybrid": fused_hybrid,
        "fusion_separate": lambda x: (-token_logprobs(x, labels, chunk_tokens=ct).sum()
                                      + ours_uld_gld(x, standardized_topk(x, k, chunk_tokens=ct))),
        "naive_uld+gld": naive_uld_gld,
        "naive_fusion": lambda x: (torch.nn.functional.cross_entropy(
            x.float().flatten(0, 1), labels.flatten(), reduction="sum") + naive_uld_gld(x)),
    }
    fn = fns[method]
    if method == "mcore_ce":
        own = inp["logits"].transpose(0, 1).contiguous().clone()          # [s, b, v]

        def prepare():
            own.copy_(inp["logits"].transpose(0, 1))

        def run():
            x = own.detach().requires_grad_()
            fn(x).backward()
            return x.grad
        return prepare, run

    def run():
        x = inp["logits"].detach().requires_grad_()
        fn(x).backward()
        return x.grad
    return (lambda: None), run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_copy_gbps(device, gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy rate, bytes read + written, median of ``repeats`` after warm-up."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    ts.sort()
    return 2 * n * 4 / ts[len(ts) // 2] / 1e9


def time_methods(methods, inp, args, device):
    runs = {m: build(m, inp, args) for m in methods}
    for m in methods:                       # warm-up (allocator, lazy init)
        runs[m][0]()
        runs[m][1]()
    times = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            prepare, run = runs[m]
            prepare()
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[m].append(time.perf_counter() - t0)
    # best of the repeats: on a shared machine the noise is one-sided (other work only adds time)
    return {m: min(v) for m, v in times.items()}, {m: sorted(v)[len(v) // 2] for m, v in times.items()}


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmHWM: peak resident, VmRSS: resident) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_cpu_child(args):
    """Subprocess body: peak RSS above the inputs for one forward+backward of each method."""
    setup_megatron()
    inp = make_inputs(args, torch.device("cpu"))
    methods = args.memory_of.split(",")
    runs = {m: build(m, inp, args) for m in methods}
    for m in methods:                        # warm-up: lazy init and code pages are not the loss's
        runs[m][0]()
        runs[m][1]()
    out = {}
    for m in methods:
        runs[m][0]()
        base = _status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                     # reset the peak-RSS counter to the current RSS
        grad = runs[m][1]()
        out[m] = _status_mib("VmHWM") - base
        del grad
    print(json.dumps(out))


def memory_cpu(methods, args):
    """One fresh process measures every method in turn. glibc is told to mmap blocks above 64 KiB
    and to trim at once, so memory freed by one method leaves RSS before the next is measured."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):   # the child is its own world
        env.pop(var, None)
    cmd = [sys.executable, os.path.abspath(__file__), "--vocab", str(args.vocab),
           "--seq", str(args.seq), "--batch", str(args.batch), "--dtype", args.dtype,
           "--k", str(args.k), "--_memory-of", ",".join(methods)]
    if args.chunk_tokens:
        cmd += ["--chunk-tokens", str(args.chunk_tokens)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory_gpu(methods, inp, args, device):
    """Peak MiB above the inputs per method, and the absolute peak of the whole process."""
    out = {}
    for m in methods:
        prepare, run = build(m, inp, args)
        prepare()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grad = run()
        torch.cuda.synchronize()
        out[m] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out[m + "@abs"] = torch.cuda.max_memory_allocated() / 2**20
        del grad
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.memory_of:
        return memory_cpu_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_losses: --device cuda: needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    setup_megatron()
    methods = [m for m in args.methods.split(",") if m]
    inp = make_inputs(args, device)
    n_tok = args.batch * args.seq
    shard_fp32_mib = n_tok * args.vocab * 4 / 2**20
    times, medians = time_methods(methods, inp, args, device)
    copy_gbps = None
    if device.type == "cuda":
        copy_gbps = (measure_copy_gbps(device) if args.copy_gbps == "measure"
                     else float(args.copy_gbps))
    mem = memory_gpu(methods, inp, args, device) if device.type == "cuda" else memory_cpu(methods, args)
    elt = inp["logits"].element_size()
    essential_bytes = 3 * n_tok * args.vocab * elt          # read fwd, read bwd, write grad
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench_losses: batch={args.batch} seq={args.seq} vocab={args.vocab} dtype={args.dtype} "
          f"k={args.k} on {where}; torch {torch.__version__}")
    print(f"# logits {n_tok * args.vocab * elt / 2**20:.1f} MiB; one fp32 copy = {shard_fp32_mib:.1f} MiB")
    ce_t = times.get("mcore_ce")
    naive_mem = {"uld+gld": mem.get("naive_uld+gld"), "fusion": mem.get("naive_fusion"),
                 "fusion_separate": mem.get("naive_fusion")}
    head = "| method | fwd+bwd ms | time / mcore_ce | peak extra MiB | fp32 copies | naive mem / ours |"
    if device.type == "cuda":
        head += " HBM fraction (spec) | of measured copy |"
        print(f"# HBM: {args.hbm_gbps:.0f} GB/s datasheet, {copy_gbps:.0f} GB/s copy "
              f"({'measured now' if args.copy_gbps == 'measure' else 'given'}); essential bytes "
              f"{essential_bytes / 1e9:.2f} GB (logits read twice, gradient written)")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    rows = {}
    for m in methods:
        t, x = times[m], mem[m]
        ratio_t = f"{t / ce_t:.2f}" if ce_t else "-"
        nm = naive_mem.get(m)
        ratio_m = f"{nm / x:.1f}" if nm and x > 0 else "-"
        line = (f"| {m} | {t * 1e3:.1f} | {ratio_t} | {x:.1f} | {x / shard_fp32_mib:.2f} | "
                f"{ratio_m} |")
        rows[m] = dict(ms=t * 1e3, ms_median=medians[m] * 1e3,
                       time_vs_mcore_ce=t / ce_t if ce_t else None, extra_mib=x,
                       fp32_copies=x / shard_fp32_mib)
        if device.type == "cuda":
            gbps = essential_bytes / t / 1e9
            line += f" {gbps / args.hbm_gbps:.2f} | {gbps / copy_gbps:.2f} |"
            rows[m].update(gbps=gbps, hbm_fraction_spec=gbps / args.hbm_gbps,
                           hbm_fraction_copy=gbps / copy_gbps, peak_mib=mem[m + "@abs"])
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=where, torch=torch.__version__, rows=rows,
                           essential_bytes=essential_bytes, logits_mib=n_tok * args.vocab * elt / 2**20,
                           copy_gbps=copy_gbps), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
