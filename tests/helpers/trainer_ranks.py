"""Rank-side helpers for the trainer tests (run through megatron_fusion.local_ranks.run_on_ranks).

Gradients are compared across layouts by dumping them with dist_checkpointing: each parameter's
``data`` is swapped for its (final, reduced) ``main_grad`` while the model's sharded state dict
is saved, so the checkpoint machinery reassembles full, unsharded gradient tensors whatever the
TP/PP layout, and ``load_plain_tensors`` reads them back by global name.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_fusion.config import load_config


def tiny_overrides(data: dict, run_dir: str) -> list[str]:
    return [
        f"run.dir={run_dir}", f"data.train={data['train']}", f"data.tokenizer={data['pivot_tokenizer']}",
        "data.valid=[]", "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=176", "model.seq_length=64",
        "train.micro_batch=2", "train.global_batch=4", "optim.lr=1e-4", "optim.min_lr=1e-4",
        "optim.warmup_steps=0", "optim.decay=constant", "optim.weight_decay=0.0",
        "logging.wandb_mode=disabled", "logging.progress=false", "checkpoint.interval=0",
    ]


class DumpGrads:
    def __init__(self, out_dir: str, at_step: int = 1):
        self.out_dir, self.at_step = out_dir, at_step

    def before_optimizer_step(self, step, model):
        if step != self.at_step:
            return
        from megatron.core import dist_checkpointing

        swapped = []
        for chunk in model:
            for p in chunk.module.parameters():
                swapped.append((p, p.data))
                p.data = p.main_grad.to(p.dtype)
        try:
            if dist.get_rank() == 0:
                import os

                os.makedirs(self.out_dir, exist_ok=True)
            dist.barrier()
            sd = {"model": model[0].module.sharded_state_dict()} if len(model) == 1 else {
                f"model{i}": m.module.sharded_state_dict() for i, m in enumerate(model)}
            dist_checkpointing.save(sd, self.out_dir)
        finally:
            for p, data in swapped:
                p.data = data


def plain(path: str) -> dict:
    from megatron.core import dist_checkpointing

    return {k: v.clone() for k, v in dist_checkpointing.load_plain_tensors(path).items()
            if torch.is_tensor(v)}


def run_layouts(rank, world, data, root, layouts):
    """Train one step from the shared init checkpoint under each layout; return losses/grads/weights."""
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    out = {}
    for name, extra in layouts:
        run_dir = f"{root}/{name}"
        cfg = load_config(None, tiny_overrides(data, run_dir) + ["train.steps=1"] + extra)
        summary = train(cfg, hooks=DumpGrads(f"{run_dir}/grads"))
        destroy_student_groups()
        # load_plain_tensors is collective: every rank calls it, rank 0 keeps the result
        grads, weights = plain(f"{run_dir}/grads"), plain(summary["checkpoint"])
        if rank == 0:
            last = summary["last"]
            loss = next(last[k] for k in ("loss/ce", "loss/total", "fpo/loss") if k in last)
            out[name] = {"loss": loss, "grads": grads,
                         "weights": weights,
                         "last": summary["last"]}
    return out


def make_init(rank, world, data, root, variants):
    """Write step-0 checkpoints (TP1) that every layout loads, so all start from equal weights."""
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    for name, extra in variants:
        cfg = load_config(None, tiny_overrides(data, f"{root}/{name}") + ["train.steps=0"] + extra)
        train(cfg)
        destroy_student_groups()
    return True


def resume_runs(rank, world, data, root, layout, extra_overrides=()):
    """Uninterrupted 6 steps vs 3 steps + resume to 6 (same process, same run.dir re-used)."""
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    def run(run_dir, steps, extra=()):
        cfg = load_config(None, tiny_overrides(data, run_dir) + layout + [f"train.steps={steps}"]
                          + list(extra_overrides) + list(extra))
        s = train(cfg)
        destroy_student_groups()
        return s

    full = run(f"{root}/full", 6)
    run(f"{root}/split", 3)
    resumed = run(f"{root}/split", 6)
    res = {"full_ckpt": full["checkpoint"], "split_ckpt": resumed["checkpoint"],
           "resumed_from": resumed["start_step"]}
    full_w, split_w = plain(full["checkpoint"]), plain(resumed["checkpoint"])  # collective
    if rank == 0:
        res["full_w"], res["split_w"] = full_w, split_w
    return res


def resume_from_step0(rank, world, data, root):
    """train.steps=0 (an init checkpoint), then the same run.dir to 2 steps, vs 2 steps fresh."""
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    def run(run_dir, steps):
        s = train(load_config(None, tiny_overrides(data, run_dir) + [
            f"train.steps={steps}", "checkpoint.interval=1"]))
        destroy_student_groups()
        return s

    run(f"{root}/init", 0)
    resumed, fresh = run(f"{root}/init", 2), run(f"{root}/fresh", 2)
    res = {"start": resumed["start_step"], "losses": (resumed["last"], fresh["last"])}
    res["w"] = (plain(resumed["checkpoint"]), plain(fresh["checkpoint"]))
    return res


def continue_run(rank, world, data, run_dir, layout, steps):
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    cfg = load_config(None, tiny_overrides(data, run_dir) + layout + [f"train.steps={steps}"])
    s = train(cfg)
    destroy_student_groups()
    return {"start": s["start_step"], "loss": s["last"]["loss/ce"]}


def fuse_overrides(fuse: dict) -> list[str]:
    import json

    return ["stage=fuse", "fuse.teachers=" + json.dumps(fuse["teachers"]), "fuse.k=10"]


def fuse_layouts(rank, world, data, fuse, root, layouts, steps=5):
    """Train ``steps`` fusion steps from the shared init under each layout; return trajectories."""
    import json

    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    out = {}
    for name, extra in layouts:
        run_dir = f"{root}/{name}"
        cfg = load_config(None, tiny_overrides(data, run_dir) + fuse_overrides(fuse)
                          + [f"train.steps={steps}", f"checkpoint.load={root}/init"] + extra)
        train(cfg)
        destroy_student_groups()
        dist.barrier()
        if rank == 0:
            with open(f"{run_dir}/metrics.jsonl") as fh:
                out[name] = [json.loads(line) for line in fh]
    return out


def stage_errors(rank, world, data, stage_overrides, root, cases, steps=2):
    """Each case must fail before step 1; return the one-line messages (None = it trained)."""
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    msgs = {}
    for name, extra in cases:
        cfg = load_config(None, tiny_overrides(data, f"{root}/{name}") + stage_overrides
                          + [f"train.steps={steps}"] + extra)
        try:
            train(cfg)
            msgs[name] = None
        except Exception as e:  # the test checks type and text
            msgs[name] = f"{type(e).__name__}: {e}"
        destroy_student_groups()
    return msgs


def fuse_errors(rank, world, data, fuse, root, cases):
    return stage_errors(rank, world, data, fuse_overrides(fuse), root, cases, steps=2)


def fpo_overrides(fpo: dict) -> list[str]:
    import json

    return ["stage=fpo", f"data.train={fpo['train']}",
            "fpo.sources_logprobs=" + json.dumps(fpo["sources"]),
            "fpo.source_tokenizers=" + json.dumps(fpo["source_tokenizers"]),
            "fpo.fusion=max_margin", "fpo.beta=2.5", "fpo.ref_offset=1.0"]


def fpo_layouts(rank, world, data, fpo, root, layouts, steps=5, init=False):
    """(Optionally write the shared init first, then) train ``steps`` FPO steps from it under
    each layout; return each run's metrics.jsonl records (rank 0). A layout whose extra
    overrides contain ``"resume:N"`` first runs N steps, then resumes to ``steps``."""
    import json

    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    if init:
        make_init(rank, world, data, root, [("init", [])])
    out = {}
    for name, extra in layouts:
        run_dir = f"{root}/{name}"
        split = [int(e[7:]) for e in extra if e.startswith("resume:")]
        extra = [e for e in extra if not e.startswith("resume:")]
        for n in split + [steps]:
            cfg = load_config(None, tiny_overrides(data, run_dir) + fpo_overrides(fpo)
                              + [f"train.steps={n}", f"checkpoint.load={root}/init"] + extra)
            summary = train(cfg)
            destroy_student_groups()
        dist.barrier()
        if rank == 0:
            with open(f"{run_dir}/metrics.jsonl") as fh:
                out[name] = {"metrics": [json.loads(line) for line in fh], "summary": summary}
    return out


def fpo_errors(rank, world, data, fpo, root, cases):
    return stage_errors(rank, world, data, fpo_overrides(fpo), root, cases, steps=1)
