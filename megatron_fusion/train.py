"""The trainer: megatron-core GPTModel under any TP x PP x DP layout, one loop for every stage.

    torchrun --nproc-per-node 2 -m megatron_fusion.train --config configs/tiny_cpu.yaml parallel.tp=2
    megatron-fusion train --config configs/tiny_cpu.yaml --nproc 2        # starts torchrun itself

Flow per optimizer step: this DP rank's micro-batches -> stage.prepare_step -> Megatron's
forward/backward schedule (1F1B under PP) with ``forward_step -> (output, partial(loss_func))``
-> ``finalize_model_grads`` (DP/embedding/SP grad all-reduces, one normalisation by the global
count) -> optimizer step -> LR schedule -> one metrics all-reduce -> sink -> checkpoint.
Re-running with the same ``run.dir`` resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_fusion.config import Config, ConfigError, load_config, save_config


class TrainError(RuntimeError):
    """A user-facing failure: printed as one line, exit code 1."""


# --- data --------------------------------------------------------------------------------------

class SampleOrder:
    """Deterministic sample order: a fresh seeded permutation per epoch.

    ``indices(start, n)`` gives dataset indices of global samples start..start+n-1, so the data
    position of a run is one integer (consumed samples) and resume needs nothing else.
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise TrainError("data: the training set is empty")
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, n: int) -> list[int]:
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(start, start + n)]


def collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if torch.is_tensor(items[0][k])}
    out["sample_id"] = torch.tensor([int(it["sample_id"]) for it in items])
    b, s = out["tokens"].shape
    out["position_ids"] = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    return out


def rank_microbatches(dataset, order: SampleOrder, consumed: int, cfg: Config, dp: int,
                      dp_rank: int, collate_fn=collate) -> list[dict]:
    """This DP rank's micro-batches of the optimizer step that starts at ``consumed``."""
    gb, mb = cfg.train.global_batch, cfg.train.micro_batch
    per_rank = gb // dp
    idx = order.indices(consumed + dp_rank * per_rank, per_rank)
    return [collate_fn([dataset[i] for i in idx[j:j + mb]]) for j in range(0, per_rank, mb)]


def build_tokenizer(cfg: Config):
    """The pivot tokenizer. The tiny recipe's data (``runs/demo_data``, configs/tiny_cpu.yaml) is
    made here on first use; a missing file of another demo directory names the command that
    makes it."""
    from megatron_fusion.demo_data import ensure_demo_data, missing_data_hint
    from megatron_fusion.tokenizers import load_tokenizer

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer", "must be set")
    if not Path(cfg.data.tokenizer).exists() and not ensure_demo_data(cfg.data.tokenizer):
        raise TrainError(f"data.tokenizer: file not found: {cfg.data.tokenizer}"
                         f"{missing_data_hint(cfg.data.tokenizer)}")
    return load_tokenizer(cfg.data.tokenizer)


def build_dataset(cfg: Config, path: str, tokenizer, dataset_cls=None):
    """A JSONL file encoded with the pivot tokenizer, cached under the run (SFT by default)."""
    if dataset_cls is None:
        from megatron_fusion.data.sft import SFTDataset as dataset_cls

    if not path:
        raise ConfigError("data.train", "must be set")
    if not Path(path).is_file():
        raise TrainError(f"data: file not found: {path}")
    cache = cfg.data.cache_dir or str(Path(cfg.run.dir) / "cache")
    return dataset_cls(path, tokenizer, cfg.model.seq_length, cache_dir=cache,
                       overflow=cfg.data.overflow)


def build_sft_dataset(cfg: Config, path: str, tokenizer):
    return build_dataset(cfg, path, tokenizer)


# --- model, optimizer, schedule ----------------------------------------------------------------

@dataclass
class TrainState:
    step: int = 0
    consumed: int = 0


def build_optimizer(cfg: Config, chunks):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    ocfg = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=cfg.train.precision == "bf16",
        fp16=cfg.train.precision == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            cfg.train.precision],
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(ocfg, chunks, use_gloo_process_groups=False)
    steps = max(cfg.train.steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(steps, o.warmup_steps + 1),
        lr_decay_style=o.decay, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
    return optimizer, scheduler


def wrap_ddp(cfg: Config, chunks, tcfg):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=None)
    wrapped = []
    for i, c in enumerate(chunks):
        wrapped.append(DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=c,
                                               disable_bucketing=i > 0))
    return wrapped


# --- the loop ----------------------------------------------------------------------------------

class _Stop:
    requested = False


def _on_signal(signum, frame):  # Slurm sends SIGUSR1/SIGTERM before preemption
    _Stop.requested = True


def make_stage(cfg: Config, groups, vocab_size: int, dataset=None, tokenizer=None):
    if cfg.stage == "sft":
        from megatron_fusion.stages.sft import SFTStage

        return SFTStage(vocab_size, groups.tp)
    if cfg.stage == "fuse":
        from megatron_fusion.stages.fuse import FuseStage

        return FuseStage(cfg, vocab_size, groups, dataset=dataset, tokenizer=tokenizer)
    if cfg.stage == "fpo":
        from megatron_fusion.stages.fpo import FPOStage

        return FPOStage(cfg, vocab_size, groups, dataset=dataset, tokenizer=tokenizer)
    raise ConfigError("stage", f"unknown stage {cfg.stage!r}")


def forward_step(stage, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)  # causal mask built inside
    return output, partial(stage.loss_func, batch)


def _reduce_reports(reports: list[dict], keys: list[str], groups, stop: bool) -> tuple[dict, bool]:
    """Sum [sum, count] per key over micro-batches, DP and PP (one all-reduce over the world)."""
    vec = torch.zeros(2 * len(keys) + 1, dtype=torch.float64)
    if groups.is_last_stage and groups.tp_rank == 0:
        for rep in reports:
            for i, k in enumerate(keys):
                if k in rep:
                    vec[2 * i:2 * i + 2] += rep[k].detach().double().cpu()
    vec[-1] = float(stop)
    dist.all_reduce(vec)
    out = {}
    for i, k in enumerate(keys):
        s, c = vec[2 * i].item(), vec[2 * i + 1].item()
        out[k] = s / c if c > 0 else 0.0
        out[k + "_count"] = c
    return out, vec[-1].item() > 0


def evaluate(cfg, chunks, stage, datasets: dict, groups, dp: int) -> dict:
    """Held-out CE/perplexity per domain (first eval_batches micro-batches of each file)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    out = {}
    for name, ds in datasets.items():
        mb = cfg.train.micro_batch
        n = min(len(ds), cfg.train.eval_batches * mb * dp)
        n -= n % (mb * dp)
        if n == 0:
            continue
        per_rank = n // dp
        idx = list(range(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank))
        micro = [collate([ds[i] for i in idx[j:j + mb]]) for j in range(0, per_rank, mb)]
        sft = stage.eval_stage() if hasattr(stage, "eval_stage") else stage
        for c in chunks:
            c.eval()
        with torch.no_grad():
            reports = fb(forward_step_func=partial(forward_step, sft),
                         data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
                         model=chunks if len(chunks) > 1 else chunks[0],
                         num_microbatches=len(micro), seq_length=cfg.model.seq_length,
                         micro_batch_size=mb, forward_only=True)
        for c in chunks:
            c.train()
        red, _ = _reduce_reports(reports or [], ["loss/ce"], groups, False)
        out[f"eval/{name}/ce"] = red["loss/ce"]
        out[f"eval/{name}/ppl"] = math.exp(min(red["loss/ce"], 50.0))
    if hasattr(stage, "evaluate"):  # a stage's own held-out metrics (FPO: preference accuracy)
        out.update(stage.evaluate(chunks))
    return out


def train(cfg: Config, hooks=None) -> dict:
    """Run (or resume) training; returns the final summary on every rank.

    ``hooks`` (tests, tools) may define ``before_optimizer_step(step, model_chunks)``, called
    with gradients final (after ``finalize_model_grads``) and before the update.
    """
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_fusion import checkpoint as ckpt
    from megatron_fusion.metrics import MetricsSink
    from megatron_fusion.model import build_model, check_fp8
    from megatron_fusion.parallel import init_student_groups, launch_world_size

    world = launch_world_size()  # student + online teacher ranks (validate_layout subtracts them)
    dp = cfg.validate_layout(world)
    if cfg.optim.clip_grad > 0 and not torch.cuda.is_available():
        raise ConfigError("optim.clip_grad", "gradient clipping needs CUDA in megatron-core 0.16; "
                                             "set optim.clip_grad=0 on CPU")
    if cfg.parallel.distributed_optimizer and not torch.cuda.is_available():
        raise ConfigError("parallel.distributed_optimizer", "megatron-core 0.16's distributed "
                          "optimizer asserts CUDA tensor types; set it false on CPU")
    check_fp8(cfg)
    groups = init_student_groups(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
    run_dir = Path(cfg.run.dir)
    is_rank0 = dist.get_rank() == 0
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)

    # data (all ranks read the same files; each takes its DP slice)
    tokenizer = build_tokenizer(cfg)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} < tokenizer vocab "
                                              f"{tokenizer.vocab_size} ({cfg.data.tokenizer})")
    if is_rank0:
        save_config(cfg, run_dir / "config.yaml")
    train_ds = stage_dataset(cfg, tokenizer)
    valid = {Path(p).stem: build_sft_dataset(cfg, p, tokenizer) for p in cfg.data.valid}
    order = SampleOrder(len(train_ds), cfg.train.seed)

    # model
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    # The embedding keeps the padded vocab of the checkpoint we start from (a run converted or
    # saved at another TP); any TP that divides it loads, padded columns never count.
    ckpt_root = run_dir / "checkpoints"
    latest = ckpt.latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    init_from = latest or cfg.checkpoint.load
    padded = cfg.model.padded_vocab_size(cfg.parallel.tp)
    if init_from:
        saved = ckpt.saved_padded_vocab(init_from, cfg.model)
        if saved != padded:
            if saved % cfg.parallel.tp:
                raise ConfigError("parallel.tp", f"{cfg.parallel.tp} does not divide the padded "
                                  f"vocab {saved} of {init_from}")
            padded = saved
    chunks = build_model(cfg, vocab_size=padded)
    tcfg = chunks[0].config
    model = wrap_ddp(cfg, chunks, tcfg)
    optimizer, scheduler = build_optimizer(cfg, model)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    if len(model) == 1:
        tcfg.no_sync_func = model[0].no_sync
    else:
        tcfg.no_sync_func = [m.no_sync for m in model]
    stage = make_stage(cfg, groups, cfg.model.vocab_size, train_ds, tokenizer)

    layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp, "dp": dp}
    state = TrainState()
    if latest is not None:
        meta = ckpt.load_checkpoint(latest, model, optimizer, scheduler, layout=layout)
        state = TrainState(step=meta["step"], consumed=meta["consumed"])
        if meta.get("global_batch") not in (None, cfg.train.global_batch):
            raise ConfigError("train.global_batch", f"{cfg.train.global_batch} differs from the "
                              f"checkpoint's {meta['global_batch']} ({latest})")
    elif cfg.checkpoint.load:
        ckpt.load_checkpoint(cfg.checkpoint.load, model, optimizer, scheduler, layout=layout,
                             load_optimizer=False)

    # A stage whose samples are several sequences (FPO: chosen + rejected) says so; the p2p
    # shapes of the pipeline schedule are per sequence.
    seqs_per_micro = cfg.train.micro_batch * getattr(stage, "sequences_per_sample", 1)
    if hasattr(stage, "setup"):  # e.g. FPO's reference log-prob pass over the data, once
        stage.setup(model=model, groups=groups, dp=dp, resumed=latest is not None,
                    forward_step=forward_step)

    sink = MetricsSink(run_dir, total_steps=cfg.train.steps, start_step=state.step,
                       wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                       wandb_entity=cfg.logging.wandb_entity, run_name=cfg.run.name,
                       config=cfg.to_dict(), progress=cfg.logging.progress, enabled=is_rank0)
    if latest is not None:
        sink.print(f"resumed from {latest} at step {state.step}")
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)

    fb = get_forward_backward_func()
    extra = lambda: {"consumed": state.consumed, "layout": layout,  # noqa: E731
                     "global_batch": cfg.train.global_batch}
    summary: dict = {"start_step": state.step}
    has_eval = bool(valid) or hasattr(stage, "evaluate")
    eval_before = evaluate(cfg, model, stage, valid, groups, dp) if has_eval else {}
    if eval_before:
        sink.log(state.step, eval_before)
    summary["eval_before"] = eval_before
    tokens_per_step = cfg.train.global_batch * cfg.model.seq_length * getattr(stage, "sequences_per_sample", 1)
    t_start = time.perf_counter()
    steps_run = 0
    stopped_early = False
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        micro = rank_microbatches(train_ds, order, state.consumed, cfg, dp, groups.dp_rank,
                                  getattr(stage, "collate", collate))
        stage.prepare_step(micro, groups)
        optimizer.zero_grad()
        for m in model:
            m.zero_grad_buffer()
        reports = fb(forward_step_func=partial(forward_step, stage),
                     data_iterator=[iter(micro) for _ in model] if len(model) > 1 else iter(micro),
                     model=model if len(model) > 1 else model[0],
                     num_microbatches=len(micro), seq_length=cfg.model.seq_length,
                     micro_batch_size=seqs_per_micro, forward_only=False)
        red, stop = _reduce_reports(reports or [], stage.report_keys, groups, _Stop.requested)
        bad = [k for k in stage.report_keys if not math.isfinite(red[k])]
        if bad:
            last = ckpt.latest_checkpoint(ckpt_root)
            raise TrainError(f"non-finite {bad[0]}={red[bad[0]]} at step {state.step + 1}; "
                             f"stopping without saving (last good checkpoint: {last or 'none'})")
        if hooks is not None and hasattr(hooks, "before_optimizer_step"):
            hooks.before_optimizer_step(state.step + 1, model)
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        state.step += 1
        state.consumed += cfg.train.global_batch
        steps_run += 1
        dt = time.perf_counter() - t0
        metrics = {k: v for k, v in red.items() if not k.endswith("_count")}
        if "loss/total" not in metrics and "loss/ce" in metrics and cfg.stage == "sft":
            metrics["loss/total"] = metrics["loss/ce"]
        metrics.update({"lr": optimizer.param_groups[0]["lr"], "perf/step_s": dt,
                        "perf/tokens_per_s": tokens_per_step / dt})
        metrics.update(getattr(stage, "step_metrics", lambda: {})())
        if cfg.train.eval_interval and state.step % cfg.train.eval_interval == 0 and has_eval:
            metrics.update(evaluate(cfg, model, stage, valid, groups, dp))
        if state.step % cfg.logging.interval == 0 or state.step == cfg.train.steps:
            sink.log(state.step, metrics)
        else:
            sink.advance(state.step)
        summary["last"] = metrics
        if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0:
            ckpt.save_checkpoint(ckpt_root, state.step, model, optimizer, scheduler,
                                 extra=extra(), keep=cfg.checkpoint.keep)
        if stop:
            stopped_early = True
            break
    elapsed = time.perf_counter() - t_start
    final = ckpt.latest_checkpoint(ckpt_root)
    if final is None or not final.name.endswith(f"{state.step:07d}"):
        final = ckpt.save_checkpoint(ckpt_root, state.step, model, optimizer, scheduler,
                                     extra=extra(), keep=cfg.checkpoint.keep)
    eval_after = evaluate(cfg, model, stage, valid, groups, dp) if has_eval else {}
    if eval_after:
        sink.log(state.step, eval_after)
    summary.update(step=state.step, steps_run=steps_run, elapsed_s=elapsed,
                   eval_after=eval_after, checkpoint=str(final), stopped_early=stopped_early,
                   metrics_file=str(run_dir / "metrics.jsonl"), wandb_dir=sink.wandb_dir)
    sink.summary({k: v for k, v in eval_after.items()})
    sink.close()
    if is_rank0:
        _print_summary(cfg, summary)
    return summary


def stage_dataset(cfg: Config, tokenizer):
    if cfg.stage == "fpo":
        from megatron_fusion.stages.fpo import build_preference_dataset

        return build_preference_dataset(cfg, tokenizer)
    return build_sft_dataset(cfg, cfg.data.train, tokenizer)


def _print_summary(cfg: Config, s: dict) -> None:
    last = s.get("last", {})
    lines = [f"run {cfg.run.dir}: step {s['step']} ({s['steps_run']} this launch, "
             f"{s['elapsed_s']:.1f}s)" + ("; stopped on signal, resumable" if s["stopped_early"] else "")]
    for k in ("loss/total", "loss/ce", "loss/uld", "loss/gld", "fpo/loss", "perf/tokens_per_s"):
        if k in last:
            lines.append(f"  {k:20s} {last[k]:.4f}")
    for k, v in s.get("eval_after", {}).items():
        before = s.get("eval_before", {}).get(k)
        lines.append(f"  {k:20s} {v:.4f}" + (f"  (before {before:.4f})" if before is not None else ""))
    lines.append(f"  checkpoint           {s['checkpoint']}")
    lines.append(f"  metrics              {s['metrics_file']}")
    if s.get("wandb_dir"):
        lines.append(f"  wandb                {s['wandb_dir']}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron_fusion.train", description="megatron-fusion trainer")
    ap.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from megatron_fusion.parallel import init_distributed

    init_distributed(online_teachers=_online_teachers(cfg))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    code = 0
    try:
        _run_role(cfg)
    except (ConfigError, TrainError) as e:
        _report(e)
        code = 2 if isinstance(e, ConfigError) else 1
    except Exception as e:
        from megatron_fusion.errors import user_facing

        if not user_facing(e):
            raise
        _report(e)
        code = 1
    finally:
        if dist.is_initialized():
            try:
                if code == 0:
                    dist.barrier()
                dist.destroy_process_group()
            except Exception:
                pass
    return code


# --- online teachers: the launch's teacher ranks run the teacher loop (megatron_fusion.online) --

def _online_teachers(cfg: Config) -> list[tuple[str, int, int]]:
    return [(t.name, t.ranks, t.tp) for t in cfg.fuse.teachers
            if t.source == "online"] if cfg.stage == "fuse" else []


def _run_role(cfg: Config) -> None:
    from megatron_fusion.parallel import world_split

    split = world_split()
    if split is not None and split.teacher is not None:
        from megatron_fusion.online import run_teacher

        run_teacher(cfg, split)
    else:
        train(cfg)


def _report(e: Exception) -> None:
    if dist.get_rank() == 0:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(msg if msg.startswith(("config error", "error")) else f"error: {msg}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
