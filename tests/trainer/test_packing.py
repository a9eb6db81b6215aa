"""Sequence packing through the model and the trainer (docs/methods.md §10).

- the model: a packed row's logits equal each sample's own unpacked forward (float error), and
  a sample never attends to another (perturbing one sample leaves the others' logits bit-equal);
- the trainer: packed == unpacked step-1 losses and gradients for the same
  samples, for ``sft`` at TP1, TP2 and DP2 and for ``fuse`` (ULD + GLD, minCE weights) at TP1
  and TP2, each packed run checked to hold fewer slots than the unpacked one;
- resume of a packed run is bit-identical;
- Transformer Engine's THD path on a GPU (skips without one).
"""

from __future__ import annotations

import pytest
import torch

from megatron_fusion.local_ranks import run_on_ranks
from tests.helpers import trainer_ranks as tr
from tests.trainer.test_trainer_parallel import _rel

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# seq 128 holds 2-3 demo samples per row (mean 43 slots); 8 samples a step
SFT = ["model.seq_length=128", "train.global_batch=8"]
PACK = ["data.packing=greedy"]


# --- the model ---------------------------------------------------------------------------------

def _model_ranks(rank, world, data, run_dir, impl):
    from megatron.core import tensor_parallel

    from megatron_fusion.config import load_config
    from megatron_fusion.data.packing import pack_step
    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.model import build_model, model_forward, uses_te_attention
    from megatron_fusion.parallel import destroy_student_groups, init_student_groups
    from megatron_fusion.tokenizers import load_tokenizer

    cfg = load_config(None, tr.tiny_overrides(data, run_dir) + SFT + PACK
                      + [f"model.transformer_impl={impl}"])
    init_student_groups(1, 1)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    tok = load_tokenizer(data["pivot_tokenizer"])
    cfg.model.vocab_size = tok.vocab_size
    model = build_model(cfg)[0].eval()
    dev = next(model.parameters()).device
    ds = SFTDataset(data["train"], tok, cfg.model.seq_length)
    s = cfg.model.seq_length
    # the three shortest samples share one row (the longest first: first-fit-decreasing)
    picked = sorted((ds[i] for i in range(len(ds))), key=lambda it: it["length"])[:3][::-1]
    mb = pack_step(picked, seq_len=s, rows_per_micro=1, pad_id=ds.pad_id)[0]
    assert mb["tokens"].shape[0] == 1 and len(mb["segments"]) == 3
    mb = {k: v.to(dev) if torch.is_tensor(v) and k not in ("sample_id", "step_pos") else v
          for k, v in mb.items()}
    with torch.no_grad():
        packed = model_forward(model, mb).float().cpu()                       # [1, s, v]
        alone = []
        for it in picked:   # each sample on its own, unpacked (megatron's causal mask)
            t = it["tokens"][None].to(dev)
            pos = torch.arange(s, device=dev)[None]
            alone.append(model(t, pos, None).float().cpu()[0])
        # perturb the last sample's tokens
        r, st, n = mb["segments"][2].tolist()
        other = dict(mb)
        other["tokens"] = mb["tokens"].clone()
        other["tokens"][r, st:st + n] = (mb["tokens"][r, st:st + n] + 7) % tok.vocab_size
        perturbed = model_forward(model, other).float().cpu()
    destroy_student_groups()
    return {"segments": mb["segments"].cpu().tolist(), "packed": packed, "alone": alone,
            "perturbed": perturbed, "te": uses_te_attention(model)}


def _check_model(res, tol):
    packed, perturbed = res["packed"][0], res["perturbed"][0]
    for i, (_, st, n) in enumerate(res["segments"]):
        ref = res["alone"][i][:n]
        err = (packed[st:st + n] - ref).abs().max() / ref.abs().max()
        assert err <= tol, (i, float(err))
        if i < 2:   # untouched samples: bit-equal logits
            assert torch.equal(perturbed[st:st + n], packed[st:st + n]), i
        else:       # the perturbed one changed (the check above is not vacuous)
            assert not torch.allclose(perturbed[st:st + n], packed[st:st + n])


def test_packed_row_equals_each_sample_alone_and_samples_are_isolated(demo_data, tmp_path):
    res = run_on_ranks(_model_ranks, 1, (demo_data, str(tmp_path / "run"), "local"))[0]
    assert not res["te"]
    _check_model(res, tol=1e-5)


@pytest.mark.gpu
def test_te_thd_packed_row_equals_each_sample_alone(demo_data, tmp_path):
    from megatron_fusion.model import te_available

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (Transformer Engine's THD attention)")
    if not te_available():
        pytest.skip("needs Transformer Engine (it does not import on this GPU machine)")
    res = run_on_ranks(_model_ranks, 1, (demo_data, str(tmp_path / "run"), "transformer_engine"))[0]
    assert res["te"]
    _check_model(res, tol=1e-4)


# --- the trainer: packed == unpacked -----------------------------------------------------------

def _fmt(extra, root):
    return [e.format(root=root) for e in extra]


def _check_packed(res, name, ref, tol=1e-5):
    got, want = res[name], res[ref]
    # the packed step held the same samples in fewer slots
    assert got["last"]["perf/tokens_per_s"] / got["last"]["perf/real_tokens_per_s"] < \
        want["last"]["perf/tokens_per_s"] / want["last"]["perf/real_tokens_per_s"] - 0.1
    assert got["last"]["data/packing_efficiency"] > want["last"]["data/packing_efficiency"]
    assert got["loss"] == pytest.approx(want["loss"], rel=tol)
    # gradients (not Adam's first update: it divides by sqrt(v) and so turns float noise in a
    # near-zero gradient entry into a full lr-sized step)
    keys = sorted(k for k in want["grads"] if not k.startswith("optimizer"))
    assert keys and set(keys) <= set(got["grads"])
    for k in keys:
        assert _rel(got["grads"][k], want["grads"][k]) <= tol, (name, k)


@pytest.fixture(scope="module")
def sft_runs(demo_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pack_sft"))
    run_on_ranks(tr.make_init, 1, (demo_data, root, [("init", SFT)]))
    init = SFT + _fmt(["checkpoint.load={root}/init"], root)
    one = run_on_ranks(tr.run_layouts, 1, (demo_data, root, [
        ("tp1", init), ("tp1_packed", init + PACK)]))[0]
    two = run_on_ranks(tr.run_layouts, 2, (demo_data, root, [
        ("tp2_packed", init + PACK + ["parallel.tp=2"]), ("dp2_packed", init + PACK + ["train.micro_batch=1"])]),
        timeout_s=600)[0]
    return {**one, **two}


@pytest.mark.parametrize("name", ["tp1_packed", "tp2_packed", "dp2_packed"])
def test_sft_packed_matches_unpacked(sft_runs, name):
    _check_packed(sft_runs, name, "tp1")


FUSE = ["train.global_batch=8", "fuse.weighting=minCE", "fuse.lambda_gld=1.0"]


@pytest.fixture(scope="module")
def fuse_runs(demo_data, fuse_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pack_fuse"))
    run_on_ranks(tr.make_init, 1, (demo_data, root, [("init", [])]))
    init = tr.fuse_overrides(fuse_data) + FUSE + _fmt(["checkpoint.load={root}/init"], root)
    one = run_on_ranks(tr.run_layouts, 1, (demo_data, root, [
        ("tp1", init), ("tp1_packed", init + PACK)]))[0]
    two = run_on_ranks(tr.run_layouts, 2, (demo_data, root, [
        ("tp2_packed", init + PACK + ["parallel.tp=2"])]), timeout_s=600)[0]
    return {**one, **two}


@pytest.mark.parametrize("name", ["tp1_packed", "tp2_packed"])
def test_fuse_packed_matches_unpacked(fuse_runs, name):
    _check_packed(fuse_runs, name, "tp1")
    got, ref = fuse_runs[name]["last"], fuse_runs["tp1"]["last"]
    for k in ("loss/total", "loss/uld", "loss/gld", "loss/uld/tA", "loss/gld/tB",
              "teacher/tA/weight", "teacher/tA/aligned_frac"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    assert ref["loss/uld"] > 0 and ref["loss/gld"] > 0
    # minCE picked a mix of teachers (so per-sample weights were exercised)
    assert 0 < ref["teacher/tA/weight"] < 1


def test_packed_resume_is_bit_identical(demo_data, tmp_path):
    import json
    from pathlib import Path

    res = run_on_ranks(tr.resume_runs, 1, (demo_data, str(tmp_path), SFT + PACK), timeout_s=600)[0]
    assert res["resumed_from"] == 3

    def losses(d):
        return {m["step"]: m["loss/ce"] for m in map(json.loads, Path(d).read_text().splitlines())
                if "loss/ce" in m}

    full, split = losses(tmp_path / "full/metrics.jsonl"), losses(tmp_path / "split/metrics.jsonl")
    assert sorted(split) == [1, 2, 3, 4, 5, 6]
    assert all(split[s] == full[s] for s in (4, 5, 6))
    for k in res["full_w"]:
        assert torch.equal(res["full_w"][k], res["split_w"][k]), k


# --- fpo: chosen and rejected as separate segments of one micro-batch --------------------------

from tests.stages.test_fpo_stage import fpo_data  # noqa: E402,F401  (the module's fixture)


@pytest.fixture(scope="module")
def fpo_runs(demo_data, fpo_data, tmp_path_factory):  # noqa: F811
    root = str(tmp_path_factory.mktemp("pack_fpo"))
    # seq 128: 2-3 sequences a row; 8 pairs a step
    base = ["model.seq_length=128", "train.global_batch=8"]
    run_on_ranks(tr.make_init, 1, (demo_data, root, [("init", base)]))
    init = tr.fpo_overrides(fpo_data) + base + _fmt(["checkpoint.load={root}/init"], root)
    one = run_on_ranks(tr.run_layouts, 1, (demo_data, root, [
        ("tp1", init), ("tp1_packed", init + PACK)]))[0]
    two = run_on_ranks(tr.run_layouts, 2, (demo_data, root, [
        ("tp2_packed", init + PACK + ["parallel.tp=2"])]), timeout_s=600)[0]
    return {**one, **two}


@pytest.mark.parametrize("name", ["tp1_packed", "tp2_packed"])
def test_fpo_packed_matches_unpacked(fpo_runs, name):
    _check_packed(fpo_runs, name, "tp1")
    got, ref = fpo_runs[name]["last"], fpo_runs["tp1"]["last"]
    # (not fpo/accuracy: at step 1 the pivot is its own reference, every margin is float noise
    # around 0 and its sign differs between layouts)
    for k in ("rewards/chosen", "rewards/rejected", "fpo/margin"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-5), k
