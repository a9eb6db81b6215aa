"""Sequence packing through the model and the trainer (docs/methods.md §10).

- the model: a packed row's logits equal each sample's own unpacked forward (float error), and
  a sample never attends to another (perturbing one sample leaves the others' logits bit-equal);
- the trainer: packed == unpacked step-1 losses and gradients for the same
  samples, for ``sft`` at TP1, TP2, PP2 and DP2, for ``fuse`` (ULD + GLD, minCE weights), the
  hybrid loss (tail bucket, adaptive weights, avgCE, GLD) and ``fpo`` (chosen / rejected as
  segments) at TP1 and TP2, each packed run checked to hold fewer slots than the unpacked one;
- packed sft / fuse (uniform, avgCE, hybrid) / fpo micro-batches on a virtual device (no host
  tensor meets the model's);
- resume of a packed run is bit-identical;
- Transformer Engine's THD path on a GPU (skips without one).
"""

from __future__ import annotations

import pytest
import torch

from megatron_fusion.local_ranks import run_on_ranks
from tests.helpers import trainer_ranks as tr
from tests.stages import test_fpo_stage
from tests.trainer.test_trainer_parallel import _rel

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# seq 128 holds 2-3 demo samples per row (mean 43 slots); 8 samples a step
SFT = ["model.seq_length=128", "train.global_batch=8"]
PACK = ["data.packing=greedy"]
fpo_data = test_fpo_stage.fpo_data   # the FPO tests' module fixture (sources' log-prob files)


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
    mb = {k: v.to(dev) if torch.is_tensor(v) and k != "sample_id" else v
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


FUSE = ["train.global_batch=8", "fuse.weighting=minCE", "fuse.lambda_gld=1.0"]
# the hybrid loss (methods.md §9) with the tail bucket, adaptive weights, avgCE and GLD
HYBRID = ["train.global_batch=8", "fuse.weighting=avgCE", "fuse.lambda_gld=1.0",
          "fuse.loss=hybrid", "fuse.tail_bucket=true", "fuse.lambda_matched=adaptive",
          "fuse.lambda_unmatched=adaptive"]
FPO = ["model.seq_length=128", "train.global_batch=8"]   # 2-3 sequences a row; 8 pairs a step


def _one_rank(rank, world, data, root, inits, layouts, resume_dir):
    """All single-rank work in one launch (each launch costs 7-15 s of imports here): the init
    checkpoints, the TP1 layouts, the packed resume, the model-level check."""
    tr.make_init(rank, world, data, root, inits)
    out = tr.run_layouts(rank, world, data, root, layouts)
    out["resume"] = tr.resume_runs(rank, world, data, resume_dir, SFT + PACK)
    out["model"] = _model_ranks(rank, world, data, f"{root}/model", "local")
    return out


@pytest.fixture(scope="module")
def runs(demo_data, fuse_data, fpo_data, tmp_path_factory):
    """Step 1 of sft / fuse / fpo, unpacked at TP1 and packed under several layouts, each
    stage from its own shared init; plus the packed resume and the model check (TP1)."""
    root = str(tmp_path_factory.mktemp("pack"))
    stage = {"sft": SFT + [f"checkpoint.load={root}/sft_init"],
             "fuse": tr.fuse_overrides(fuse_data) + FUSE + [f"checkpoint.load={root}/fuse_init"],
             "hybrid": tr.fuse_overrides(fuse_data) + HYBRID + [f"checkpoint.load={root}/fuse_init"],
             "fpo": tr.fpo_overrides(fpo_data) + FPO + [f"checkpoint.load={root}/fpo_init"]}
    inits = [("sft_init", SFT), ("fuse_init", []), ("fpo_init", FPO)]
    one = [(f"{st}_{name}", stage[st] + extra) for st in stage
           for name, extra in (("tp1", []), ("tp1_packed", PACK))]
    two = [(f"{st}_tp2_packed", stage[st] + PACK + ["parallel.tp=2"]) for st in stage]
    two += [("sft_pp2_packed", stage["sft"] + PACK + ["parallel.pp=2"]),
            ("sft_dp2_packed", stage["sft"] + PACK + ["train.micro_batch=1"])]
    res = run_on_ranks(_one_rank, 1, (demo_data, root, inits, one, f"{root}/resume"),
                       timeout_s=900)[0]
    res.update(run_on_ranks(tr.run_layouts, 2, (demo_data, root, two), timeout_s=900)[0])
    res["resume_dir"] = f"{root}/resume"
    return res


def test_packed_row_equals_each_sample_alone_and_samples_are_isolated(runs):
    assert not runs["model"]["te"]
    _check_model(runs["model"], tol=1e-5)


@pytest.mark.parametrize("name", ["tp1_packed", "tp2_packed", "pp2_packed", "dp2_packed"])
def test_sft_packed_matches_unpacked(runs, name):
    _check_packed(runs, f"sft_{name}", "sft_tp1")


@pytest.mark.parametrize("name", ["tp1_packed", "tp2_packed"])
def test_fuse_packed_matches_unpacked(runs, name):
    _check_packed(runs, f"fuse_{name}", "fuse_tp1")
    got, ref = runs[f"fuse_{name}"]["last"], runs["fuse_tp1"]["last"]
    for k in ("loss/total", "loss/uld", "loss/gld", "loss/uld/tA", "loss/gld/tB",
              "teacher/tA/weight", "teacher/tA/aligned_frac"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    assert ref["loss/uld"] > 0 and ref["loss/gld"] > 0
    # minCE picked a mix of teachers (so per-sample weights were exercised)
    assert 0 < ref["teacher/tA/weight"] < 1


# hybrid: its matched-token inputs placed into the packed rows (to_rows), its per-position
# parts taken back per sample for the avgCE weights
@pytest.mark.parametrize("name", ["tp1_packed", "tp2_packed"])
def test_hybrid_packed_matches_unpacked(runs, name):
    _check_packed(runs, f"hybrid_{name}", "hybrid_tp1")
    got, ref = runs[f"hybrid_{name}"]["last"], runs["hybrid_tp1"]["last"]
    for k in ("loss/total", "loss/hybrid", "loss/matched", "loss/unmatched", "loss/tail",
              "loss/gld", "loss/hybrid/tA", "loss/hybrid/tB", "teacher/tA/matched_mass",
              "teacher/tB/weight", "teacher/tA/aligned_frac"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    assert "loss/uld" not in ref
    assert ref["loss/matched"] > 0 and ref["loss/unmatched"] > 0 and ref["loss/tail"] != 0
    # avgCE gave per-sample weights that are not all equal (so the per-sample sums matter)
    assert 0 < ref["teacher/tA/weight"] < 1 and ref["teacher/tA/weight"] != 0.5


# fpo: chosen and rejected as separate segments of one micro-batch
@pytest.mark.parametrize("name", ["tp1_packed", "tp2_packed"])
def test_fpo_packed_matches_unpacked(runs, name):
    _check_packed(runs, f"fpo_{name}", "fpo_tp1")
    got, ref = runs[f"fpo_{name}"]["last"], runs["fpo_tp1"]["last"]
    # (not fpo/accuracy: at step 1 the pivot is its own reference, every margin is float noise
    # around 0 and its sign differs between layouts)
    for k in ("rewards/chosen", "rewards/rejected", "fpo/margin"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-5), k


def test_packed_resume_is_bit_identical(runs):
    import json
    from pathlib import Path

    res, d = runs["resume"], Path(runs["resume_dir"])
    assert res["resumed_from"] == 3

    def losses(path):
        return {m["step"]: m["loss/ce"] for m in map(json.loads, path.read_text().splitlines())
                if "loss/ce" in m}

    full, split = losses(d / "full/metrics.jsonl"), losses(d / "split/metrics.jsonl")
    assert sorted(split) == [1, 2, 3, 4, 5, 6]
    assert all(split[s] == full[s] for s in (4, 5, 6))
    assert res["full_w"].keys() == res["split_w"].keys()
    for k in res["full_w"]:
        assert torch.equal(res["full_w"][k], res["split_w"][k]), k


# --- packed micro-batches on a virtual device (tests/trainer/test_device.py's machinery) --------

def _short(g, sid, n, seq):
    """A sample of ``n`` slots (then padding), laid out like SFTDataset's items."""
    tokens = torch.zeros(seq, dtype=torch.long)
    tokens[:n] = torch.randint(1, 96, (n,), generator=g)
    labels = torch.roll(tokens, -1)
    mask = torch.zeros(seq)
    mask[n // 3:n] = 1.0
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "sample_id": sid, "length": n}


class _ShortData:
    pad_id, file_hash, dataset_hash = 0, "f" * 16, "d" * 16

    def __init__(self, n, seq, pairs=False):
        g = torch.Generator().manual_seed(4)
        self.seq_len = seq
        lengths = [int(x) for x in torch.randint(3, seq // 2, (2 * n,), generator=g)]
        self.items = []
        for i in range(n):
            if not pairs:
                self.items.append(_short(g, 100 + i, lengths[i], seq))
                continue
            c, r = _short(g, 0, lengths[2 * i], seq), _short(g, 0, lengths[2 * i + 1], seq)
            it = {f"{side}_{k}": x[k] for side, x in (("chosen", c), ("rejected", r))
                  for k in ("tokens", "labels", "loss_mask", "length")}
            it["sample_id"] = 200 + i
            self.items.append(it)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @property
    def sample_ids(self):
        return [it["sample_id"] for it in self.items]


def _packed_stages(tmp, groups, mode=None):
    from megatron_fusion.stages.fpo import FPOStage
    from megatron_fusion.stages.fuse import FuseStage
    from megatron_fusion.stages.sft import SFTStage
    from tests.trainer import test_device as td

    sft_data, pair_data = _ShortData(8, td.SEQ), _ShortData(8, td.SEQ, pairs=True)
    fuse_cfgs, fpo_cfg = td._configs(tmp, pair_data)
    for c in (*fuse_cfgs.values(), fpo_cfg):
        c.data.packing = "greedy"
    out = {"sft": td._drive(SFTStage(td.VOCAB, groups.tp), fuse_cfgs["uniform"], groups, sft_data,
                            None, mode)}
    for w, cfg in fuse_cfgs.items():   # uniform, avgCE and hybrid (tail, adaptive, avgCE)
        hybrid = cfg.fuse.loss == "hybrid"
        stage = FuseStage(cfg, td.VOCAB, groups, teachers=[td._Teacher("tA", 1, hybrid),
                                                           td._Teacher("tB", 2, hybrid)],
                          matches=td._matches() if hybrid else None)
        out[f"fuse_{w}"] = td._drive(stage, cfg, groups, sft_data, None, mode)
    fpo = FPOStage(fpo_cfg, td.VOCAB, groups, dataset=pair_data)
    fpo.ref = -torch.rand(len(pair_data), 2, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64) * 3
    out["fpo"] = td._drive(fpo, fpo_cfg, groups, pair_data, None, mode)
    return out


def _worker_packed_virtual(rank, world, tmp):
    from tests.trainer import test_device as td

    ref = _packed_stages(tmp + "/cpu", td._groups(torch.device("cpu")))
    with td.VirtualDevice() as mode:
        got = _packed_stages(tmp + "/dev", td._groups(td.VDEV), mode)
    return ref, got


def test_packed_stages_keep_tensors_on_the_model_device(tmp_path):
    from tests.trainer import test_device as td

    ref, got = run_on_ranks(_worker_packed_virtual, 1,
                            (td._mkdirs(tmp_path, "cpu", "dev"),), timeout_s=300)[0]
    td._compare(ref, got)
    assert ref["fuse_avgCE"]["red"]["loss/uld"] > 0 and ref["fuse_avgCE"]["red"]["loss/gld"] > 0
    assert ref["fpo"]["red"]["fpo/loss"] > 0
    hyb = ref["fuse_hybrid"]["red"]
    assert hyb["loss/matched"] > 0 and hyb["loss/unmatched"] > 0 and hyb["loss/tail"] != 0
    # packed: fewer micro-batches than the 2 of 2 samples each; the same one read per step
    assert len(ref["sft"]["losses"]) == 1
    for name in ("sft", "fuse_uniform", "fuse_avgCE", "fuse_hybrid", "fpo"):
        assert got[name]["reduce_syncs"] == 1, name
    for name in ("fuse_uniform", "fuse_hybrid"):       # the step's global counts, once
        assert got[name]["prepare_syncs"] == 1, name
    assert got["fpo"]["prepare_syncs"] == 0
