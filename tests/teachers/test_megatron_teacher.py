"""A megatron-fusion run as a frozen teacher (``MegatronTeacherBackend``), offline top-K from it.

One gloo launch (2 ranks): train a tiny run at TP2 for one step (a hook keeps the model), take
its logits; rebuild it as a teacher at TP1 (weights resharded from the TP2 checkpoint) and at
TP2, compare the logits, write top-K shards (with per-sample teacher CE) at both TPs; a pp=2
parallel state is refused. Then the CLI under ``torchrun --nproc-per-node 2`` writes the same
files, byte for byte, as the library call at TP2.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_fusion.local_ranks import run_on_ranks
from megatron_fusion.teachers.shards import TopKReader

pytestmark = [pytest.mark.dist]

REPO = Path(__file__).resolve().parents[2]
SEQ = 64


def _gather_tp(x, group):
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)                                 # [b, s, v_padded]


def _teacher_ranks(rank, world, data, root, sft):
    import torch.distributed as dist

    from megatron_fusion.config import load_config
    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.parallel import destroy_student_groups, init_student_groups
    from megatron_fusion.teachers.backends import MegatronTeacherBackend
    from megatron_fusion.teachers.precompute import precompute_teacher_topk
    from megatron_fusion.teachers.topk import teacher_inputs
    from megatron_fusion.tokenizers import load_tokenizer
    from megatron_fusion.train import train
    from tests.helpers.trainer_ranks import tiny_overrides

    class KeepModel:
        model = None

        def before_optimizer_step(self, step, model):
            self.model = model                 # the same objects hold the weights after the step

    run_dir = f"{root}/run"
    keep = KeepModel()
    cfg = load_config(None, tiny_overrides(data, run_dir) + ["train.steps=1", "parallel.tp=2"])
    train(cfg, hooks=keep)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=g)   # [b, T]
    pos = torch.arange(40).unsqueeze(0).expand(2, 40)
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        ref = _gather_tp(keep.model[0](tokens, pos, None).float(),
                         ps.get_tensor_model_parallel_group())      # [b, T, v_padded]
    del keep.model
    destroy_student_groups()

    tok = load_tokenizer(data["pivot_tokenizer"])                  # teacher tokenizer = pivot's
    ds = SFTDataset(sft, tok, SEQ)
    out = {"ref": ref, "vocab": cfg.model.vocab_size}
    for tp in (1, 2):
        groups = init_student_groups(tp=tp)
        teacher = MegatronTeacherBackend(run_dir, tp_group=groups.tp)
        z = teacher.local_logits(tokens)                            # [b, T, v_padded / tp]
        out[f"tp{tp}"] = _gather_tp(z, groups.tp) if tp > 1 else z
        out[f"v_local{tp}"] = teacher.v_local
        if tp == 1:  # the same run built in bf16 (--dtype bf16): fp32 weights cast on load
            bf16 = MegatronTeacherBackend(run_dir, tp_group=groups.tp, precision="bf16")
            out["bf16_dtypes"] = sorted({str(q.dtype) for q in bf16.model.parameters()})
            out["tp1_bf16"] = bf16.local_logits(tokens)
            del bf16
        out[f"summary{tp}"] = precompute_teacher_topk(
            ds, tok, teacher, f"{root}/topk_tp{tp}", teacher="mf", samples_per_shard=4,
            batch_size=2, write=rank == 0, progress=False)
        if tp == 1:  # teacher CE straight from the full logits, one sample at a time
            out["ce_ref"] = {}
            for i in range(len(ds)):
                smp = ds.sample(i)
                P = min(len(smp.ids), SEQ)
                t_ids, _, labels, resp = teacher_inputs(smp, tok, P, with_labels=True)
                z = teacher.local_logits(torch.tensor([t_ids]))[0, :, :cfg.model.vocab_size]
                lsm = torch.log_softmax(z.double(), -1)              # [T, v]
                js = [j for j in range(len(labels)) if resp[j]]
                out["ce_ref"][smp.sample_id] = (
                    -sum(lsm[j, labels[j]].item() for j in js) / max(len(js), 1), len(js),
                    len(labels) == len(t_ids))
        dist.barrier()
        destroy_student_groups()
    init_student_groups(tp=1, pp=2)
    try:
        MegatronTeacherBackend(run_dir)
    except ValueError as e:
        out["pp_error"] = str(e)
    destroy_student_groups()
    return out


@pytest.fixture(scope="module")
def results(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_teacher")
    lines = Path(demo_data["train"]).read_text().splitlines()[:10]
    sft = root / "sft.jsonl"
    sft.write_text("\n".join(lines) + "\n")
    r0, _ = run_on_ranks(_teacher_ranks, 2, args=(demo_data, str(root), str(sft)))
    return {"root": root, "sft": sft, "data": demo_data, **r0}


def test_teacher_logits_equal_trained_model(results):
    r = results
    v = r["vocab"]
    assert r["ref"].shape == r["tp1"].shape == r["tp2"].shape and r["ref"].shape[-1] >= v
    assert r["v_local1"] == 2 * r["v_local2"] == r["ref"].shape[-1]
    # TP2 teacher from a TP2 checkpoint: the trained model itself
    assert torch.equal(r["tp2"], r["ref"])
    # TP1 teacher from the resharded TP2 checkpoint: same weights, other reduction order
    assert torch.allclose(r["tp1"][..., :v], r["ref"][..., :v], rtol=1e-5, atol=1e-5)
    assert "pipeline size 1" in r["pp_error"]


def test_teacher_precision_override_bf16(results):
    """``MegatronTeacherBackend(precision="bf16")`` (the tools' --dtype bf16): bf16 weights, and
    logits within bf16 rounding of the fp32 teacher's."""
    r = results
    v = r["vocab"]
    assert r["bf16_dtypes"] == ["torch.bfloat16"]
    ref, got = r["tp1"][..., :v], r["tp1_bf16"][..., :v].float()
    assert got.shape == ref.shape and not torch.equal(got, ref)     # it did run in bf16
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 0.05 * scale, ((got - ref).abs().max(), scale)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_tp2_shards_equal_tp1(results):
    r = results
    assert r["summary1"]["aligned_fraction"] == r["summary2"]["aligned_fraction"] == 1.0
    r1, r2 = TopKReader(r["root"] / "topk_tp1"), TopKReader(r["root"] / "topk_tp2")
    assert r1.sample_ids == r2.sample_ids and len(r1) >= 5 and r1.header == r2.header
    n_vals = n_exact = 0
    for sid in r1.sample_ids:
        v1, i1, m1, l1 = r1.get(sid, logprobs=True)
        v2, i2, m2, l2 = r2.get(sid, logprobs=True)
        assert m1.any() and torch.equal(m1, m2) and torch.equal(i1, i2)
        # format 4: log-probs within one step of the 16-bit code (2^-10), the values derived
        # from them within that over sigma + eps
        assert torch.allclose(l1, l2, rtol=0, atol=2 ** -10)
        assert torch.allclose(v1, v2, rtol=2 ** -7, atol=2e-3)
        n_vals += l1.numel()
        n_exact += int((l1 == l2).sum())
    assert n_exact >= 0.9 * n_vals
    ids = r1.sample_ids
    assert torch.equal(r1.teacher_ce_tokens(ids), r2.teacher_ce_tokens(ids))
    assert (r1.teacher_ce_tokens(ids) > 0).all() and r1.teacher_ce(ids).isfinite().all()
    assert torch.allclose(r1.teacher_ce(ids), r2.teacher_ce(ids), rtol=1e-5, atol=0)
    # == a direct log-softmax over the teacher's response labels; truncated samples (the pivot's
    # window ends inside the response) count the teacher token just past the cut as a label
    ref = r["ce_ref"]
    assert sorted(ref) == ids and any(cut for _, _, cut in ref.values())
    assert r1.teacher_ce_tokens(ids).tolist() == [ref[i][1] for i in ids]
    assert torch.allclose(r1.teacher_ce(ids), torch.tensor([ref[i][0] for i in ids]), rtol=1e-5)


def test_cli_torchrun_tp2_matches_library(results):
    r = results
    out = r["root"] / "topk_cli"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tools" / "precompute_teacher_topk.py"), "--backend", "megatron",
           "--checkpoint", str(r["root"] / "run"), "--data", str(r["sft"]),
           "--pivot-tokenizer", r["data"]["pivot_tokenizer"], "--teacher-name", "mf",
           "--out", str(out), "--seq-len", str(SEQ), "--samples-per-shard", "4",
           "--batch-size", "2", "--no-progress"]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert '"aligned_fraction": 1.0' in p.stdout
    ref = sorted((r["root"] / "topk_tp2").iterdir())
    assert [q.name for q in ref] == sorted(q.name for q in out.iterdir()) and len(ref) == 2
    assert all(filecmp.cmp(q, out / q.name, shallow=False) for q in ref)
