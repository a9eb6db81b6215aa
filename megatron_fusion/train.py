"""The trainer: megatron-core GPTModel under any TP x PP x DP layout, one loop for every stage.

    torchrun --nproc-per-node 2 -m megatron_fusion.train --config configs/test/tiny_cpu.yaml parallel.tp=2
    megatron-fusion train --config configs/test/tiny_cpu.yaml --nproc 2        # starts torchrun itself

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
from megatron_fusion.data.build import build_sft_dataset, build_tokenizer
from megatron_fusion.data.order import SampleOrder, collate, rank_microbatches
from megatron_fusion.stages import build_stage, stage_class
from megatron_fusion.errors import UserError
from megatron_fusion.parallel import to_device


class TrainError(UserError, RuntimeError):
    """A user-facing failure: printed as one line, exit code 1."""


# --- data --------------------------------------------------------------------------------------


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


def forward_step(stage, data_iterator, model):
    from megatron_fusion.model import model_forward

    batch = next(data_iterator)
    output = model_forward(model, batch)  # causal, or per-sample for packed rows (methods.md §10)
    return output, partial(stage.loss_func, batch)


def _reduce_reports(reports: list[dict], keys: list[str], groups, stop: bool,
                    counts: dict[str, float] | None = None) -> tuple[dict, bool]:
    """Sum [sum, count] per key over micro-batches, DP and PP (one all-reduce over the world).

    ``counts``: host numbers of this DP rank (e.g. its real tokens and slots), summed over DP
    into ``out[name]`` in the same all-reduce. The vector lives on ``groups.device`` (the
    reports' device; NCCL takes no host tensor) and is read back once (``tolist``): the step's
    one metrics sync (docs/methods.md).
    """
    counts = counts or {}
    n = 2 * len(keys)
    vec = torch.zeros(n + 1 + len(counts), dtype=torch.float64, device=groups.device)
    if groups.is_last_stage and groups.tp_rank == 0:   # one rank per DP replica
        for rep in reports:
            for i, k in enumerate(keys):
                if k in rep:
                    vec[2 * i:2 * i + 2] += rep[k].detach().double()
        if counts:
            vec[n + 1:] = torch.tensor(list(counts.values()), dtype=torch.float64,
                                       device=groups.device)
    vec[n] = float(stop)
    dist.all_reduce(vec)
    host = vec.cpu().tolist()
    out = {}
    for i, k in enumerate(keys):
        s, c = host[2 * i], host[2 * i + 1]
        out[k] = s / c if c > 0 else 0.0
        out[k + "_count"] = c
    out.update(zip(counts, host[n + 1:]))
    return out, host[n] > 0


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
        micro = [to_device(collate([ds[i] for i in idx[j:j + mb]]), groups.device)
                 for j in range(0, per_rank, mb)]
        sft = stage.eval_stage()
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
    if stage.has_evaluate:  # a stage's own held-out metrics (FPO: preference accuracy)
        out.update(stage.evaluate(chunks))
    return out


class Trainer:
    """One run of the loop, split the way torchtitan splits its trainer:

    ``Trainer(cfg)`` sets up (layout checks, process groups, data, model, optimizer, stage,
    checkpoint, metrics sink), ``train_step()`` takes one optimizer step, ``finish()`` saves the
    final checkpoint and evaluates; ``run()`` is the three in order.

    ``hooks`` (tests, tools) may define ``before_optimizer_step(step, model_chunks)``, called
    with gradients final (after ``finalize_model_grads``) and before the update.
    """

    def __init__(self, cfg: Config, hooks=None):
        from megatron_fusion import run_guard
        from megatron_fusion.model import check_fp8
        from megatron_fusion.parallel import init_student_groups, launch_world_size

        self.cfg, self.hooks = cfg, hooks
        world = launch_world_size()  # student + online teacher ranks (validate_layout subtracts)
        self.dp = cfg.validate_layout(world)
        if cfg.optim.clip_grad > 0 and not torch.cuda.is_available():
            raise ConfigError("optim.clip_grad", "gradient clipping needs CUDA in megatron-core "
                                                 "0.16; set optim.clip_grad=0 on CPU")
        if cfg.parallel.distributed_optimizer and not torch.cuda.is_available():
            raise ConfigError("parallel.distributed_optimizer", "megatron-core 0.16's distributed "
                              "optimizer asserts CUDA tensor types; set it false on CPU")
        check_fp8(cfg)
        self.groups = init_student_groups(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
        self.run_dir = Path(cfg.run.dir)
        self.is_rank0 = dist.get_rank() == 0
        self.lock = None
        if self.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = run_guard.RunDirLock(self.run_dir)  # one live run per run.dir
        try:
            self._setup_data()
            self._setup_model()
            self._setup_run()
        except BaseException:
            self.release()
            raise

    def _setup_data(self) -> None:
        """Tokenizer and datasets (all ranks read the same files; each takes its DP slice)."""
        cfg = self.cfg
        self.tokenizer = build_tokenizer(cfg)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        elif cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} < tokenizer vocab "
                                                  f"{self.tokenizer.vocab_size} ({cfg.data.tokenizer})")
        if self.is_rank0:
            save_config(cfg, self.run_dir / "config.yaml")
        self.train_ds = stage_class(cfg.stage).build_dataset(cfg, self.tokenizer)
        self.valid = {Path(p).stem: build_sft_dataset(cfg, p, self.tokenizer) for p in cfg.data.valid}
        self.order = SampleOrder(len(self.train_ds), cfg.train.seed)

    def _setup_model(self) -> None:
        """Model, DDP, optimizer, schedule, stage; weights from the latest checkpoint or ``load``."""
        from megatron.core import tensor_parallel
        from megatron.core.distributed import finalize_model_grads

        from megatron_fusion import checkpoint as ckpt
        from megatron_fusion.model import build_model

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        # The embedding keeps the padded vocab of the checkpoint we start from (a run converted or
        # saved at another TP); any TP that divides it loads, padded columns never count.
        self.ckpt_root = self.run_dir / "checkpoints"
        latest = ckpt.latest_checkpoint(self.ckpt_root) if cfg.checkpoint.resume else None
        init_from = latest or cfg.checkpoint.load
        padded = cfg.model.padded_vocab_size(cfg.parallel.tp)
        if init_from:
            saved = ckpt.saved_padded_vocab(init_from, cfg.model)
            if saved != padded:
                if saved % cfg.parallel.tp:
                    raise ConfigError("parallel.tp", f"{cfg.parallel.tp} does not divide the "
                                      f"padded vocab {saved} of {init_from}")
                padded = saved
        chunks = build_model(cfg, vocab_size=padded)
        tcfg = chunks[0].config
        self.model = wrap_ddp(cfg, chunks, tcfg)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.grad_scale_func = self.optimizer.scale_loss
        tcfg.no_sync_func = (self.model[0].no_sync if len(self.model) == 1
                             else [m.no_sync for m in self.model])
        # The stage's softmax / z-score / top-K run over the tokenizer's ids: embedding rows past
        # them (Qwen2.5's padded vocab, model.vocab_size > tokenizer) are never a target.
        self.stage = build_stage(cfg, self.tokenizer.vocab_size, self.groups, self.train_ds,
                                 self.tokenizer)
        self.layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp,
                       "dp": self.dp}
        self.state, self.latest = TrainState(), latest
        if latest is not None:
            meta = ckpt.load_checkpoint(latest, self.model, self.optimizer, self.scheduler,
                                        layout=self.layout)
            self.state = TrainState(step=meta["step"], consumed=meta["consumed"])
            if meta.get("global_batch") not in (None, cfg.train.global_batch):
                raise ConfigError("train.global_batch", f"{cfg.train.global_batch} differs from "
                                  f"the checkpoint's {meta['global_batch']} ({latest})")
        elif cfg.checkpoint.load:
            ckpt.load_checkpoint(cfg.checkpoint.load, self.model, self.optimizer, self.scheduler,
                                 layout=self.layout, load_optimizer=False)

    def _setup_run(self) -> None:
        """The stage's one-off setup, the metrics sink, signals, and the held-out eval before."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_fusion.metrics import MetricsSink

        cfg, stage = self.cfg, self.stage
        stage.setup(model=self.model, groups=self.groups, dp=self.dp,  # FPO: the reference pass
                    resumed=self.latest is not None, forward_step=forward_step)
        self.sink = MetricsSink(self.run_dir, total_steps=cfg.train.steps,
                                start_step=self.state.step, wandb_mode=cfg.logging.wandb_mode,
                                wandb_project=cfg.logging.wandb_project,
                                wandb_entity=cfg.logging.wandb_entity, run_name=cfg.run.name,
                                config=cfg.to_dict(), progress=cfg.logging.progress,
                                enabled=self.is_rank0)
        if self.latest is not None:
            self.sink.print(f"resumed from {self.latest} at step {self.state.step}")
        if cfg.data.packing != "none" and self.is_rank0:   # data stats (methods.md §10)
            from megatron_fusion.data.order import packing_efficiency

            eff = packing_efficiency(self.train_ds, self.order, cfg, self.dp, stage.collate)
            self.sink.print(f"data: packing {cfg.data.packing}: real tokens / slots "
                            f"{eff[cfg.data.packing]:.3f} over the first steps "
                            f"(unpacked {eff['none']:.3f})")
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, _on_signal)
        self.fb = get_forward_backward_func()
        # the pipeline's p2p shapes are per sequence (FPO: chosen + rejected per sample)
        self.seqs_per_micro = cfg.train.micro_batch * stage.sequences_per_sample
        self.has_eval = bool(self.valid) or stage.has_evaluate
        self.summary: dict = {"start_step": self.state.step, "eval_before": self.evaluate()}
        if self.summary["eval_before"]:
            self.sink.log(self.state.step, self.summary["eval_before"])
        self.steps_run, self.stopped_early = 0, False

    def evaluate(self) -> dict:
        if not self.has_eval:
            return {}
        return evaluate(self.cfg, self.model, self.stage, self.valid, self.groups, self.dp)

    def train_step(self) -> bool:
        """One optimizer step (forward/backward over this rank's micro-batches, update, metrics,
        eval and checkpoint when due); True when a stop signal asks the run to end here."""
        from megatron_fusion import checkpoint as ckpt

        cfg, stage, model, state = self.cfg, self.stage, self.model, self.state
        t0 = time.perf_counter()
        micro = rank_microbatches(self.train_ds, self.order, state.consumed, cfg, self.dp,
                                  self.groups.dp_rank, stage.collate, device=self.groups.device)
        stage.step = state.step + 1
        stage.prepare_step(micro, self.groups)
        self.optimizer.zero_grad()
        for m in model:
            m.zero_grad_buffer()
        reports = self.fb(forward_step_func=partial(forward_step, stage),
                          data_iterator=[iter(micro) for _ in model] if len(model) > 1 else iter(micro),
                          model=model if len(model) > 1 else model[0],
                          num_microbatches=len(micro), seq_length=cfg.model.seq_length,
                          micro_batch_size=self.seqs_per_micro, forward_only=False)
        # real tokens (slots that hold a sample) and slots of this rank's step: host ints of the
        # micro-batches (data/packing.py), summed over DP in the metrics all-reduce
        tokens = {"real": float(sum(m.get("real_tokens", m["tokens"].numel()) for m in micro)),
                  "slots": float(sum(m.get("slots", m["tokens"].numel()) for m in micro))}
        red, stop = _reduce_reports(reports or [], stage.report_keys, self.groups, _Stop.requested,
                                    counts=tokens)
        bad = [k for k in stage.report_keys if not math.isfinite(red[k])]
        if bad:
            last = ckpt.latest_checkpoint(self.ckpt_root)
            raise TrainError(f"non-finite {bad[0]}={red[bad[0]]} at step {state.step + 1}; "
                             f"stopping without saving (last good checkpoint: {last or 'none'})")
        if self.hooks is not None and hasattr(self.hooks, "before_optimizer_step"):
            self.hooks.before_optimizer_step(state.step + 1, model)
        self.optimizer.step()
        self.scheduler.step(increment=1)
        state.step += 1
        state.consumed += cfg.train.global_batch
        self.steps_run += 1
        dt = time.perf_counter() - t0
        real, slots = red.pop("real"), red.pop("slots")
        metrics = {k: v for k, v in red.items() if not k.endswith("_count")}
        metrics = stage.derive_metrics(metrics)
        if "loss/total" not in metrics and stage.total_alias in metrics:
            metrics["loss/total"] = metrics[stage.total_alias]
        metrics.update({"lr": self.optimizer.param_groups[0]["lr"], "perf/step_s": dt,
                        "perf/tokens_per_s": slots / dt, "perf/real_tokens_per_s": real / dt,
                        "data/packing_efficiency": real / slots if slots else 0.0})
        metrics.update(stage.step_metrics())
        if cfg.train.eval_interval and state.step % cfg.train.eval_interval == 0:
            metrics.update(self.evaluate())
        if state.step % cfg.logging.interval == 0 or state.step == cfg.train.steps:
            self.sink.log(state.step, metrics)
        else:
            self.sink.advance(state.step)
        self.summary["last"] = metrics
        if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0:
            self.save()
        if self.lock is not None:
            self.lock.heartbeat()
        return stop

    def save(self):
        from megatron_fusion import checkpoint as ckpt

        extra = {"consumed": self.state.consumed, "layout": self.layout,
                 "global_batch": self.cfg.train.global_batch}
        return ckpt.save_checkpoint(self.ckpt_root, self.state.step, self.model, self.optimizer,
                                    self.scheduler, extra=extra, keep=self.cfg.checkpoint.keep)

    def finish(self, elapsed: float) -> dict:
        """The final checkpoint (unless this step's is saved), the held-out eval after, the summary."""
        from megatron_fusion import checkpoint as ckpt

        final = ckpt.latest_checkpoint(self.ckpt_root)
        if final is None or not final.name.endswith(f"{self.state.step:07d}"):
            final = self.save()
        eval_after = self.evaluate()
        if eval_after:
            self.sink.log(self.state.step, eval_after)
        self.summary.update(step=self.state.step, steps_run=self.steps_run, elapsed_s=elapsed,
                            eval_after=eval_after, checkpoint=str(final),
                            stopped_early=self.stopped_early,
                            metrics_file=str(self.run_dir / "metrics.jsonl"),
                            wandb_dir=self.sink.wandb_dir)
        self.sink.summary(dict(eval_after))
        self.sink.close()
        if self.is_rank0:
            _print_summary(self.cfg, self.summary)
        return self.summary

    def run(self) -> dict:
        try:
            t_start = time.perf_counter()
            while self.state.step < self.cfg.train.steps:
                if self.train_step():
                    self.stopped_early = True
                    break
            return self.finish(time.perf_counter() - t_start)
        finally:
            self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def train(cfg: Config, hooks=None) -> dict:
    """Run (or resume) training; returns the final summary on every rank (``Trainer``)."""
    return Trainer(cfg, hooks).run()


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
    if "LOCAL_RANK" in os.environ:  # a torchrun rank: it dies with its launcher (run_guard)
        from megatron_fusion import run_guard

        run_guard.die_with_parent()
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
    code = 1      # until the role returns: a rank that fails never waits in the final barrier
    try:
        _run_role(cfg)
        code = 0
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


# --- online teachers: the launch's teacher ranks run the teacher loop (teachers.online.server) --

def _online_teachers(cfg: Config) -> list[tuple[str, int, int]]:
    return [(t.name, t.ranks, t.tp) for t in cfg.online_teachers()]


def _run_role(cfg: Config) -> None:
    from megatron_fusion.parallel import world_split

    split = world_split()
    if split is not None and split.teacher is not None:
        from megatron_fusion.teachers.online.server import run_teacher

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
