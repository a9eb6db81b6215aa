"""Layer specs: TE <-> local names of GPTModel state dicts and checkpoints (checkpoint.py, convert.py).

Transformer Engine does not install here, so the TE layout is written out from megatron-core
0.16.1's naming (``te_named_state_dict``: the norms inside TELayerNormColumnParallelLinear as
``layer_norm_weight``/``layer_norm_bias``, the final norm a TENorm, an ``_extra_state`` on every
TE module) and, for checkpoints, built by applying the mapping to a real local GPTModel. Checked:
the mapping round-trips exactly both ways; the hand-written TE dict maps onto exactly a real
local model's keys and shapes; an HF conversion written in either spec loads into both layouts
strictly; a checkpoint saved by the trainer on CPU loads into the TE layout, is written back as
a TE-spec checkpoint and loads into the local model bit-identically. On a GPU with TE: a run
saved with TE resumes with the local spec and back.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megatron_fusion.checkpoint import EXTRA_STATE, map_name, map_state_dict

# the tiny model of every check here (ModelConfig below): GQA 4 heads / 2 groups, head dim 16
H, F, V, LAYERS, QKV = 64, 96, 384, 2, (4 + 2 * 2) * 16


def te_named_state_dict(norm: str = "RMSNorm", qkv_bias: bool = False, seed: int = 0) -> dict:
    """A TE-spec GPTModel state dict from megatron-core's TE naming, without FP8 state (TE's
    empty extra state). Written independently of checkpoint.py's rules."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def empty():
        return torch.empty(0, dtype=torch.uint8)

    sd = {"embedding.word_embeddings.weight": r(V, H)}
    for i in range(LAYERS):
        att, mlp = f"decoder.layers.{i}.self_attention.", f"decoder.layers.{i}.mlp."
        sd[att + "linear_qkv.layer_norm_weight"] = r(H)
        if norm == "LayerNorm":
            sd[att + "linear_qkv.layer_norm_bias"] = r(H)
        sd[att + "linear_qkv.weight"] = r(QKV, H)
        if qkv_bias:
            sd[att + "linear_qkv.bias"] = r(QKV)
        sd[att + "linear_qkv._extra_state"] = empty()
        sd[att + "core_attention._extra_state"] = empty()
        sd[att + "linear_proj.weight"] = r(H, H)
        sd[att + "linear_proj._extra_state"] = empty()
        sd[mlp + "linear_fc1.layer_norm_weight"] = r(H)
        if norm == "LayerNorm":
            sd[mlp + "linear_fc1.layer_norm_bias"] = r(H)
        sd[mlp + "linear_fc1.weight"] = r(2 * F, H)
        sd[mlp + "linear_fc1._extra_state"] = empty()
        sd[mlp + "linear_fc2.weight"] = r(H, F)
        sd[mlp + "linear_fc2._extra_state"] = empty()
    sd["decoder.final_layernorm.weight"] = r(H)
    if norm == "LayerNorm":
        sd["decoder.final_layernorm.bias"] = r(H)
    sd["decoder.final_layernorm._extra_state"] = empty()
    sd["output_layer.weight"] = r(V, H)
    sd["output_layer._extra_state"] = None     # megatron's own ColumnParallelLinear in both specs
    return sd


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --- the mapping on plain state dicts (no ranks) --------------------------------------------

@pytest.mark.parametrize("norm,qkv_bias", [("RMSNorm", False), ("LayerNorm", True)])
def test_te_to_local_to_te_round_trips_exactly(norm, qkv_bias):
    te = te_named_state_dict(norm, qkv_bias)
    local = map_state_dict(te, "te", "local")
    assert "decoder.layers.1.input_layernorm.norm.weight" in local
    assert "decoder.final_layernorm.norm.weight" in local
    assert not any("layer_norm_" in k or "core_attention" in k for k in local)
    assert (norm == "LayerNorm") == ("decoder.layers.0.pre_mlp_layernorm.norm.bias" in local)
    assert torch.equal(local["decoder.layers.1.pre_mlp_layernorm.norm.weight"],
                       te["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"])
    assert_same(map_state_dict(local, "local", "te"), te)


def test_te_to_local_drops_fp8_extra_state():
    """FP8 scaling history (a non-empty TE extra state) has no place in the local model."""
    te = te_named_state_dict()
    te["decoder.layers.0.self_attention.linear_qkv._extra_state"] = torch.arange(7, dtype=torch.uint8)
    te["decoder.layers.0.self_attention.core_attention._extra_state"] = torch.arange(5, dtype=torch.uint8)
    local = map_state_dict(te, "te", "local")
    assert local["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
    assert not any("core_attention" in k or k == "decoder.final_layernorm._extra_state" for k in local)
    back = map_state_dict(local, "local", "te")
    assert back["decoder.layers.0.self_attention.linear_qkv._extra_state"].numel() == 0


def test_same_spec_is_identity_and_unknown_spec_fails():
    from megatron_fusion.checkpoint import CheckpointError

    te = te_named_state_dict()
    assert_same(map_state_dict(te, "te", "te"), te)
    with pytest.raises(CheckpointError, match="'tex'"):
        map_name("decoder.final_layernorm.weight", "tex", "local")


# --- against a real local GPTModel, conversions and trainer checkpoints (one gloo launch) -----

def _model_cfg(norm="RMSNorm", qkv_bias=False):
    from megatron_fusion.config import ModelConfig

    return ModelConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=F, vocab_size=300, seq_length=32, normalization=norm,
                       swiglu=True, add_qkv_bias=qkv_bias, make_vocab_size_divisible_by=128)


def _local_model(m, padded=V, seed=1):
    from megatron_fusion.config import Config
    from megatron_fusion.convert import _build_single

    cfg = Config(model=m)
    cfg.train.seed = seed
    return _build_single(cfg, padded)


def _te_layout(model) -> tuple[dict, set]:
    """The TE model's sharded state dict, from a real local model with the mapping applied
    (dict keys: TE plain names; checkpoint keys: TE sharded names), plus TE >= 2's extra state
    of the final norm (which the local spec lacks); and the TE plain key set."""
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    ssd = {}
    for k, v in model.sharded_state_dict().items():
        v.key = map_name(v.key, "local", "te", sharded=True)
        ssd[map_name(k, "local", "te")] = v
    key = "decoder.final_layernorm._extra_state"
    ssd[key] = make_sharded_object_for_checkpoint(torch.empty(0, dtype=torch.uint8), key,
                                                  replica_id=(0, 0, 0))
    return ssd, set(map_state_dict(model.state_dict(), "local", "te"))


def _load_te_layout(ckpt, model) -> dict:
    """Load checkpoint ``ckpt`` into the TE layout built from ``model``; strict key set."""
    import json

    from megatron_fusion.checkpoint import (fill_extra_state, load_sharded_model_state,
                                            saved_layer_spec)

    meta = json.loads((ckpt / "meta.json").read_text())
    ssd, te_keys = _te_layout(model)
    loaded = load_sharded_model_state(ckpt, {"model": ssd}, model_spec="te",
                                      saved_spec=saved_layer_spec(meta, ckpt))["model"]
    loaded = fill_extra_state(loaded, te_keys)
    assert set(loaded) == te_keys, set(loaded) ^ te_keys
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in loaded.items()}


def _save_te_checkpoint(te_plain: dict, model, out, step: int) -> None:
    """Write ``te_plain`` (TE names) as a TE-spec checkpoint, through a local model's tensors."""
    import json

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_fusion.checkpoint import rename_sharded_keys

    model.load_state_dict(map_state_dict(te_plain, "te", "local"), strict=True)
    ssd = model.sharded_state_dict()
    rename_sharded_keys(ssd, "local", "te")
    out.mkdir(parents=True)
    dist_checkpointing.save({"model": ssd}, str(out))
    dist.barrier()
    (out / "meta.json").write_text(json.dumps({"step": step, "layer_spec": "te",
                                               "layout": {"tp": 1, "pp": 1, "vpp": None, "dp": 1}}))


def _weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def _spec_ranks(rank, world, hf_dir, root, demo_data):
    import json
    from pathlib import Path

    from megatron.core import dist_checkpointing, tensor_parallel

    from megatron_fusion.checkpoint import load_model_weights, resolve_checkpoint, saved_padded_vocab
    from megatron_fusion.config import load_config
    from megatron_fusion.convert import hf_to_megatron, megatron_to_hf
    from megatron_fusion.model import build_model
    from megatron_fusion.parallel import destroy_student_groups, init_student_groups
    from megatron_fusion.train import train
    from tests.helpers.trainer_ranks import tiny_overrides

    root = Path(root)
    out = {"local_keys": {}, "local_state": {}, "sharded": {}}
    for norm, bias in (("RMSNorm", False), ("LayerNorm", True)):
        model = _local_model(_model_cfg(norm, bias))
        sd = model.state_dict()
        out["local_keys"][norm] = {k: (None if v is None else tuple(v.shape)) for k, v in sd.items()}
        out["local_state"][norm] = {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                    for k, v in sd.items()}
        out["sharded"][norm] = {k: v.key for k, v in model.sharded_state_dict().items()}

    # an HF conversion in each spec, loaded into the local model and into the TE layout
    conv = {}
    for spec in ("te", "local"):
        ckpt = hf_to_megatron(hf_dir, root / f"conv_{spec}", spec=spec)
        destroy_student_groups()
        local = _local_model(_model_cfg(), seed=7)
        init = _weights(local)
        load_model_weights(ckpt, [local])
        conv[spec] = {"meta": json.loads((ckpt / "meta.json").read_text())["layer_spec"],
                      "keys": set(dist_checkpointing.load_tensors_metadata(str(ckpt))),
                      "init": init, "local": _weights(local), "local_full": dict(local.state_dict()),
                      "te": _load_te_layout(ckpt, _local_model(_model_cfg(), seed=8))}
        destroy_student_groups()
    out["conv"] = conv
    megatron_to_hf(root / "conv_te", root / "hf_back_te")          # the way back from TE names
    destroy_student_groups()

    # a trainer checkpoint (CPU: local spec) -> TE layout -> TE-spec checkpoint -> local model
    cfg = load_config(None, tiny_overrides(demo_data, str(root / "run")) + ["train.steps=2"])
    ckpt = resolve_checkpoint(train(cfg)["checkpoint"])
    destroy_student_groups()

    def fresh(seed):                        # the trainer's model, differently initialised
        init_student_groups(1, 1)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return build_model(cfg, vocab_size=saved_padded_vocab(ckpt, cfg.model))[0]

    a = fresh(11)
    saved_meta = load_model_weights(ckpt, [a])
    te_plain = _load_te_layout(ckpt, fresh(12))
    te_ckpt = root / "run_te" / "iter_0000002"
    _save_te_checkpoint(te_plain, fresh(13), te_ckpt, 2)
    c = fresh(14)
    te_meta = load_model_weights(te_ckpt, [c])
    out["trainer"] = {"meta": saved_meta.get("layer_spec"), "te_meta": te_meta["layer_spec"],
                      "a": dict(a.state_dict()), "te": te_plain, "c": dict(c.state_dict()),
                      "init": _weights(fresh(15))}
    destroy_student_groups()
    return out


@pytest.fixture(scope="module")
def spec_runs(tmp_path_factory, demo_data):
    from megatron_fusion.local_ranks import run_on_ranks
    from tests.test_convert import _make_hf

    root = tmp_path_factory.mktemp("layer_spec")
    hf = _make_hf("llama", root / "hf_llama", seed=3)["hf"]
    out = run_on_ranks(_spec_ranks, 1, (hf, str(root), demo_data), timeout_s=900)[0]
    out.update(hf=hf, hf_back=str(root / "hf_back_te"))
    return out




@pytest.mark.dist
@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_te_naming_maps_onto_a_real_local_model(spec_runs, norm):
    te = te_named_state_dict(norm, qkv_bias=norm == "LayerNorm")
    got = {k: (None if v is None else tuple(v.shape)) for k, v in map_state_dict(te, "te", "local").items()}
    assert got == spec_runs["local_keys"][norm]


@pytest.mark.dist
@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_local_to_te_to_local_round_trips_a_real_model_exactly(spec_runs, norm):
    local = spec_runs["local_state"][norm]
    te = map_state_dict(local, "local", "te")
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in te
    assert_same(map_state_dict(te, "te", "local"), local)


@pytest.mark.dist
@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_sharded_names_are_the_plain_ones_without_layer_index(spec_runs, norm):
    """TE checkpoint keys = TE plain names with the layer index dropped (the TE layer has no
    key map for these); the local ones go through the local spec's sharded_state_dict_keys_map."""
    for plain, sharded in spec_runs["sharded"][norm].items():
        te_sharded = re.sub(r"layers\.\d+\.", "layers.", map_name(plain, "local", "te"))
        assert map_name(sharded, "local", "te", sharded=True) == te_sharded, plain
        assert map_name(te_sharded, "te", "local", sharded=True) == sharded, plain


@pytest.mark.dist
def test_conversion_in_either_spec_loads_into_both_layouts(spec_runs):
    conv = spec_runs["conv"]
    assert conv["te"]["meta"] == "te" and conv["local"]["meta"] == "local"
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in conv["te"]["keys"]
    assert "decoder.final_layernorm.weight" in conv["te"]["keys"]
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_norm.weight" in conv["local"]["keys"]
    assert not any("layer_norm_norm" in k or "final_layernorm.norm" in k for k in conv["te"]["keys"])
    ref = conv["local"]["local"]
    assert any(not torch.equal(ref[k], conv["local"]["init"][k]) for k in ref)   # it loaded
    for spec in ("te", "local"):
        assert_same(conv[spec]["local"], ref)
        expected = map_state_dict(conv[spec]["local_full"], "local", "te")
        te = conv[spec]["te"]
        assert set(te) == set(expected)
        for k, v in expected.items():
            if k.endswith(EXTRA_STATE):
                assert te[k] is None or te[k].numel() == 0, k
            else:
                assert torch.equal(te[k], v), k


@pytest.mark.dist
def test_te_named_conversion_converts_back_to_the_same_hf_tensors(spec_runs):
    from safetensors.torch import load_file

    orig = load_file(str(Path(spec_runs["hf"]) / "model.safetensors"))
    back = load_file(str(Path(spec_runs["hf_back"]) / "model.safetensors"))
    assert orig.keys() == back.keys()
    assert all(torch.equal(orig[k], back[k]) for k in orig)


@pytest.mark.dist
def test_trainer_checkpoint_to_te_layout_and_back_is_bit_identical(spec_runs):
    t = spec_runs["trainer"]
    assert t["meta"] == "local" and t["te_meta"] == "te"
    assert any(not torch.equal(t["a"][k], v) for k, v in t["init"].items())   # it loaded
    expected = map_state_dict(t["a"], "local", "te")
    assert set(t["te"]) == set(expected)
    for k, v in expected.items():
        if not k.endswith(EXTRA_STATE):
            assert torch.equal(t["te"][k], v), k
    assert_same(t["c"], t["a"])


# --- on a GPU with Transformer Engine ---------------------------------------------------------

def _te_local_te(rank, world, demo_data, run_dir):
    from megatron_fusion.config import load_config
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train
    from tests.helpers.trainer_ranks import plain, tiny_overrides

    res = []
    for steps, impl in ((2, "transformer_engine"), (3, "local"), (4, "transformer_engine")):
        cfg = load_config(None, tiny_overrides(demo_data, run_dir) + [
            f"train.steps={steps}", f"model.transformer_impl={impl}", "train.precision=bf16"])
        s = train(cfg)
        destroy_student_groups()
        res.append({"start": s["start_step"], "loss": s["last"]["loss/ce"], "ckpt": s["checkpoint"],
                    "w": plain(s["checkpoint"])})
    return res


@pytest.mark.gpu
def test_te_checkpoint_resumes_with_local_and_back(demo_data, tmp_path):
    from megatron_fusion.model import te_available

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not te_available():
        pytest.skip("needs Transformer Engine (it does not import on this GPU machine)")
    import json
    from pathlib import Path

    from megatron_fusion.local_ranks import run_on_ranks

    res = run_on_ranks(_te_local_te, 1, (demo_data, str(tmp_path / "run")), timeout_s=900)[0]
    assert [r["start"] for r in res] == [0, 2, 3]
    specs = [json.loads((Path(r["ckpt"]) / "meta.json").read_text())["layer_spec"] for r in res]
    assert specs == ["te", "local", "te"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res)
    # the local run wrote local names, the TE runs TE names
    assert "decoder.final_layernorm.norm.weight" in res[1]["w"]
    assert "decoder.final_layernorm.weight" in res[2]["w"]


# --- a resume across specs, optimizer included (TE simulated on CPU) -------------------------

def _as_te_model(on: bool, _real={}):
    """While ``on``: checkpoint.py sees every model as a TE model, i.e. its sharded state dict
    carries TE checkpoint names (the mapping applied, as a TE model's own keys are) and saves
    record layer_spec "te"."""
    from megatron_fusion import checkpoint as ck

    if not _real:
        _real.update(sd=ck._model_sharded_state_dict, spec=ck.model_layer_spec)
    if not on:
        ck._model_sharded_state_dict, ck.model_layer_spec = _real["sd"], _real["spec"]
        return

    def te_sharded(chunks):
        state = _real["sd"](chunks)
        for sd in state.values():
            ck.rename_sharded_keys(sd, "local", "te")
        return state

    ck._model_sharded_state_dict, ck.model_layer_spec = te_sharded, (lambda module: "te")


def _resume_ranks(rank, world, demo_data, root):
    import json
    from pathlib import Path

    from megatron_fusion.config import load_config
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train
    from tests.helpers.trainer_ranks import plain, tiny_overrides

    def run(run_dir, steps, te):
        cfg = load_config(None, tiny_overrides(demo_data, f"{root}/{run_dir}") + [f"train.steps={steps}"])
        _as_te_model(te)
        try:
            s = train(cfg)
        finally:
            _as_te_model(False)
            destroy_student_groups()
        meta = json.loads((Path(s["checkpoint"]) / "meta.json").read_text())
        return {"start": s["start_step"], "spec": meta["layer_spec"], "ckpt": s["checkpoint"]}

    full = run("full", 4, False)
    split = [run("split", 2, True), run("split", 3, False), run("split", 4, True)]
    metrics = {name: {m["step"]: m["loss/ce"] for m in map(json.loads, Path(
        f"{root}/{name}/metrics.jsonl").read_text().splitlines()) if "loss/ce" in m}
        for name in ("full", "split")}
    return {"full": full, "split": split, "metrics": metrics,
            "full_w": plain(full["ckpt"]), "split_w": plain(split[-1]["ckpt"])}


@pytest.mark.dist
@pytest.mark.slow
def test_resume_te_to_local_and_back_is_bit_identical(demo_data, tmp_path):
    """Steps 1-2 saved with TE names, step 3 resumed by a local model (saves local names), step 4
    by a TE model again: same losses and same weights + Adam moments as one local run."""
    from megatron_fusion.local_ranks import run_on_ranks

    r = run_on_ranks(_resume_ranks, 1, (demo_data, str(tmp_path)), timeout_s=900)[0]
    assert [(s["start"], s["spec"]) for s in r["split"]] == [(0, "te"), (2, "local"), (3, "te")]
    assert r["full"]["spec"] == "local"
    full, split = r["metrics"]["full"], r["metrics"]["split"]
    assert sorted(split) == sorted(full) == [1, 2, 3, 4]
    assert all(split[s] == full[s] for s in (3, 4)), (split, full)   # bit for bit
    want = {map_name(k, "local", "te", sharded=True): v for k, v in r["full_w"].items()}
    assert "decoder.final_layernorm.weight" in r["split_w"]
    assert any(k.startswith("optimizer") and "layer_norm_weight" in k for k in r["split_w"])
    assert want.keys() == r["split_w"].keys()
    for k, v in want.items():
        assert torch.equal(r["split_w"][k], v), k


# --- fused kernels only where their import exists --------------------------------------------

def test_fused_softmax_only_where_its_kernels_import(monkeypatch):
    from megatron_fusion import model
    from megatron_fusion.config import Config

    assert model.build_transformer_config(Config()).masked_softmax_fusion is False   # CPU
    assert "plain softmax" in model.kernel_report(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model, "_module_exists", lambda name: False)    # a GPU without Apex
    assert model.fused_softmax_available() is False
    assert model.build_transformer_config(Config()).masked_softmax_fusion is False
    assert model.kernel_report(False).endswith("plain softmax (no compiled scaled_*_softmax_cuda kernels)")
    monkeypatch.setattr(model, "_module_exists", lambda name: True)
    assert model.fused_softmax_available() is True
    assert model.build_transformer_config(Config()).masked_softmax_fusion is True
    assert "Apex fused masked softmax" in model.kernel_report(False)
    assert model.kernel_report(True).startswith("kernels: Transformer Engine layers")
