"""Teacher top-K and source log-probs on the model's device, over the true vocabulary.

- ``compute_batch_topk`` / ``score_batch`` driven by a backend whose logits live on another device
  than the host batch: ``FakeAccelerator`` (below) keeps real CPU data behind tensors that report
  the ``meta`` device, refuses any op that mixes them with a non-scalar host tensor (stricter than
  CUDA, which would at least accept host index tensors), and counts device-to-host copies. The
  results must equal the plain CPU run, with ONE host copy per batch.
- An HF teacher whose ``config.vocab_size`` is larger than its tokenizer (padding rows, as
  Qwen2.5's 152,064 rows for 151,665 tokens) with huge logits on the padding rows: the z-score
  statistics, the top-K, the teacher CE and the source log-probs use the tokenizer's ids only
  (independent reference: plain float64 formulas over ``logits[..., :n_tokens]``).
- ``@pytest.mark.gpu``: the HF backend on CUDA in bf16 against the fp32 CPU top-K.

Run: ``pytest -q tests/test_teacher_device.py`` (``-m gpu`` on a CUDA machine for the last one).
"""

import pydoc_data.topics as topics
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from megatron_fusion.data import PreferenceDataset, SFTDataset
from megatron_fusion.data.synthetic import write_synthetic
from megatron_fusion.teachers.source_logprobs import precompute_source_logprobs, score_batch
from megatron_fusion.teachers.backends import HFTeacherBackend, true_vocab_size
from megatron_fusion.teachers.topk import compute_batch_topk, teacher_inputs
from megatron_fusion.tokenizers import train_byte_bpe, train_sentencepiece
from megatron_fusion.teachers.shards import SourceLogprobStore

transformers = pytest.importorskip("transformers", reason="the HF teacher backend needs transformers")

SEQ, K, EPS = 128, 8, 1e-6
N_PAD = 29            # padding rows past the tokenizer's ids
PAD_LOGIT = 1e4       # huge: a padding row would win every top-K and dominate mean/std/logsumexp
DEV = torch.device("meta")


# ---------------------------------------------------------------- a fake accelerator on CPU torch
class OnDevice(torch.Tensor):
    """Real CPU data (``elem``) behind a tensor that reports the ``meta`` device."""

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                dtype=elem.dtype, device=DEV)
        r.elem = elem
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an OnDevice tensor outside FakeAccelerator")


class FakeAccelerator(TorchDispatchMode):
    """Factories and copies with ``device=meta`` make OnDevice tensors; ops on OnDevice tensors
    run on their data and return OnDevice; an op mixing them with a host tensor of dim >= 1
    raises (as CUDA's "Expected all tensors to be on the same device"); ``.cpu()`` of an
    OnDevice tensor is a device-to-host copy (counted in ``d2h``)."""

    def __init__(self):
        super().__init__()
        self.d2h = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_dev = [isinstance(t, OnDevice) for t in tensors]
        to_dev = kwargs.get("device") is not None and torch.device(kwargs["device"]) == DEV
        if func.overloadpacket is torch.ops.aten._to_copy and kwargs.get("device") is not None:
            x = args[0]
            base = x.elem if isinstance(x, OnDevice) else x
            if to_dev:
                return OnDevice(func(base, *args[1:], **dict(kwargs, device=torch.device("cpu"))))
            if isinstance(x, OnDevice):
                self.d2h += 1
                return func(base, *args[1:], **kwargs)
        if any(on_dev) and not all(on_dev):
            host = [tuple(t.shape) for t in tensors if not isinstance(t, OnDevice) and t.dim()]
            if host:
                raise RuntimeError(f"{func}: tensors on the device and host tensors {host}")
        if to_dev:
            kwargs = dict(kwargs, device=torch.device("cpu"))
        unwrap = lambda t: t.elem if isinstance(t, OnDevice) else t   # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if not (any(on_dev) or to_dev) or func.overloadpacket is torch.ops.aten._local_scalar_dense:
            return out
        return tree_map(lambda t: OnDevice(t) if type(t) is torch.Tensor else t, out)


class FakeDeviceBackend:
    """An HF backend whose logits are on the fake device (its forward itself runs on the host)."""

    def __init__(self, inner: HFTeacherBackend):
        self.inner, self.vocab_size, self.tp_group = inner, inner.vocab_size, None

    def local_logits(self, input_ids):
        assert not isinstance(input_ids, OnDevice)
        return OnDevice(self.inner.local_logits(input_ids))


def test_fake_accelerator_catches_mixing():
    with FakeAccelerator() as acc:
        x = torch.arange(6.0).to(DEV)
        assert isinstance(x, OnDevice) and x.device == DEV
        y = (x * 2 + torch.ones(6, device=DEV)).cpu()
        assert acc.d2h == 1 and torch.equal(y, torch.arange(6.0) * 2 + 1)
        with pytest.raises(RuntimeError, match="host tensors"):
            x + torch.ones(6)
        host = torch.zeros(6)
        with pytest.raises(RuntimeError, match="host tensors"):
            host[torch.arange(6) > 2] = x[:3]


# ---------------------------------------------------------------- a teacher with padding rows
@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher_device")
    corpus = list(topics.topics.values())[:30]
    pivot_tok = train_sentencepiece(corpus, 500, d / "pivot.model")
    teacher_tok = train_byte_bpe(corpus, 389, d / "teacher_tok")
    n_tok = teacher_tok.vocab_size
    files = write_synthetic(d / "data", 6, seed=3)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=n_tok + N_PAD, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 20)    # spread the real logits: no near-ties
        head.bias.zero_()
        head.bias[n_tok:] = PAD_LOGIT                  # padding rows: huge logits everywhere
    model.lm_head = head
    sft = SFTDataset(files["sft"], pivot_tok, SEQ)
    pref = PreferenceDataset(files["preference"], teacher_tok, SEQ)
    return {"model": model, "n_tok": n_tok, "pivot_tok": pivot_tok, "teacher_tok": teacher_tok,
            "sft": sft, "pref": pref}


def _topk_batch(p, backend, samples):
    return compute_batch_topk(samples, backend, p["teacher_tok"], p["pivot_tok"], SEQ, k=K,
                              eps=EPS, alignment="offset", max_teacher_len=None)


def test_true_vocab_is_the_tokenizers(padded):
    p = padded
    backend = HFTeacherBackend(model=p["model"])
    assert backend.vocab_size == p["n_tok"] + N_PAD
    assert true_vocab_size(backend, p["teacher_tok"]) == p["n_tok"]
    small = HFTeacherBackend(model=transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=p["n_tok"] - 1, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1)))
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        true_vocab_size(small, p["teacher_tok"])


def test_padded_rows_never_enter_the_teacher_topk(padded):
    """Top-K values/ids and teacher CE == float64 formulas over the tokenizer's ids only."""
    p = padded
    n_tok, ds = p["n_tok"], p["sft"]
    samples = [ds.sample(i) for i in range(len(ds))]
    res = _topk_batch(p, HFTeacherBackend(model=p["model"]), samples)
    n_checked = 0
    for smp, r in zip(samples, res):
        P = min(len(smp.ids), SEQ)
        t_ids, t_offs, t_labels, t_resp = teacher_inputs(smp, p["teacher_tok"], P,
                                                         with_labels=True)
        with torch.no_grad():
            z = p["model"](torch.tensor([t_ids])).logits[0].double()    # [T, n_tok + N_PAD]
        assert (z[:, n_tok:] > PAD_LOGIT / 2).all()                     # the trap is armed
        z = z[:, :n_tok]                                                # the true vocabulary
        zs = (z - z.mean(-1, keepdim=True)) / (z.std(-1, unbiased=False, keepdim=True) + EPS)
        ref_v, ref_i = zs.topk(K, dim=-1)                               # [T, K]
        lsm = torch.log_softmax(z, -1)
        js = [j for j in range(len(t_labels)) if t_resp[j]]
        ref_ce = -sum(lsm[j, t_labels[j]].item() for j in js) / len(js)
        assert r.teacher_ce_tokens == len(js)
        assert abs(r.teacher_ce - ref_ce) <= 1e-5 * abs(ref_ce)
        assert r.ids.shape == (P, K) and int(r.ids.max()) < n_tok
        for t in r.aligned_mask.nonzero().squeeze(1).tolist():
            j = [jj for jj, (a, b) in enumerate(t_offs) if b == smp.offsets[t][1] and a < b][-1]
            assert torch.equal(r.ids[t], ref_i[j])
            assert torch.allclose(r.values[t].double(), ref_v[j], atol=1e-4)
            # the log-probs and (d, c) of format-4 shards: over the true vocabulary only
            assert torch.allclose(r.logp[t], lsm[j, ref_i[j]], atol=1e-5, rtol=0)
            assert abs(r.d[t] - (z[j].std(unbiased=False) + EPS)) <= 1e-5 * r.d[t]
            assert abs(r.c[t] - (z[j].mean() - torch.logsumexp(z[j], -1))) <= 1e-5
            n_checked += 1
        assert (r.values[~r.aligned_mask] == 0).all() and (r.ids[~r.aligned_mask] == 0).all()
        assert (r.logp[~r.aligned_mask] == 0).all() and (r.d[~r.aligned_mask] == 0).all()
    assert n_checked > 50


def test_padded_rows_never_enter_source_logprobs(padded, tmp_path):
    p = padded
    pref, n_tok = p["pref"], p["n_tok"]
    precompute_source_logprobs(pref, HFTeacherBackend(model=p["model"]), tmp_path, source="s",
                               progress=False)
    store = SourceLogprobStore(tmp_path)
    assert len(store) == len(pref)
    for i in range(len(pref)):
        it = pref[i]
        got = store.get(it["sample_id"])
        for side in ("chosen", "rejected"):
            toks, labels, mask = (it[f"{side}_{k}"] for k in ("tokens", "labels", "loss_mask"))
            with torch.no_grad():
                z = p["model"](toks[None]).logits[0].double()[:, :n_tok]
            lsm = torch.log_softmax(z, -1)
            ref = (lsm.gather(-1, labels.clamp(0, n_tok - 1)[:, None])[:, 0]
                   * (mask > 0).double()).sum().item()
            lp = got[f"{side}_logprob"]
            assert got[f"{side}_tokens"] == int((mask > 0).sum()) > 0
            assert abs(lp - ref) <= 1e-4 * max(1.0, abs(ref)), (side, lp, ref)


def test_topk_on_another_device_one_host_copy(padded):
    """The top-K, CE and placement run where the logits are; one host copy per batch."""
    p = padded
    ds = p["sft"]
    samples = [ds.sample(i) for i in range(len(ds))]
    host = _topk_batch(p, HFTeacherBackend(model=p["model"]), samples)
    with FakeAccelerator() as acc:
        dev = _topk_batch(p, FakeDeviceBackend(HFTeacherBackend(model=p["model"])), samples)
    assert acc.d2h == 1
    assert len(dev) == len(host)
    for a, b in zip(dev, host):
        assert not isinstance(a.values, OnDevice) and a.values.device.type == "cpu"
        assert (a.sample_id, a.n_response, a.teacher_tokens, a.teacher_ce_tokens) == (
            b.sample_id, b.n_response, b.teacher_tokens, b.teacher_ce_tokens)
        assert a.values.dtype == torch.float32 and a.ids.dtype == torch.int64
        assert torch.equal(a.values, b.values) and torch.equal(a.ids, b.ids)
        assert torch.equal(a.aligned_mask, b.aligned_mask) and a.teacher_ce == b.teacher_ce
        assert a.logp.device.type == a.d.device.type == a.c.device.type == "cpu"
        assert torch.equal(a.logp, b.logp) and torch.equal(a.d, b.d) and torch.equal(a.c, b.c)


def test_source_logprobs_on_another_device_one_host_copy(padded):
    p = padded
    pref = p["pref"]
    items = [pref[i] for i in range(len(pref))]
    host = score_batch(items, HFTeacherBackend(model=p["model"]), pref.pad_id)
    with FakeAccelerator() as acc:
        dev = score_batch(items, FakeDeviceBackend(HFTeacherBackend(model=p["model"])),
                          pref.pad_id)
    assert acc.d2h == 1
    assert dev == host


# ---------------------------------------------------------------- device / dtype flags
def test_device_and_dtype_flags(tmp_path):
    from megatron_fusion.cli import precompute_topk_main as cli_main
    from megatron_fusion.teachers.backends import model_dtype, resolve_device

    assert model_dtype("auto", torch.device("cpu")) == torch.float32
    assert model_dtype(None, torch.device("cpu")) == torch.float32
    assert model_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device().type == "cuda"
        return
    assert resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(SystemExit):   # argparse: one line naming the flag, before any loading
        cli_main(["--data", "x.jsonl", "--pivot-tokenizer", "p", "--teacher-model", "m",
                  "--teacher-name", "t", "--out", str(tmp_path), "--seq-len", "8",
                  "--device", "cuda", "--dtype", "bf16"])


def test_teacher_config_dtype_validation():
    from megatron_fusion.config import ConfigError, TeacherConfig

    assert TeacherConfig(name="t", backend="hf", dtype="bf16").dtype == "bf16"
    assert TeacherConfig(name="t").dtype == "auto"
    with pytest.raises(ConfigError, match="teacher t.dtype"):
        TeacherConfig(name="t", backend="hf", dtype="int8")
    with pytest.raises(ConfigError, match="teacher t.dtype"):
        TeacherConfig(name="t", backend="megatron", dtype="bf16")


# ---------------------------------------------------------------- bf16 vs fp32 (CPU and CUDA)
def _bf16_matches_fp32(p, device: str):
    """The HF backend in bf16 on ``device``: its top-K agrees with the fp32 CPU top-K."""
    import copy

    ds = p["sft"]
    samples = [ds.sample(i) for i in range(len(ds))]
    ref = _topk_batch(p, HFTeacherBackend(model=p["model"]), samples)         # fp32, CPU
    bf16 = HFTeacherBackend(model=copy.deepcopy(p["model"]), device=device, dtype=torch.bfloat16)
    assert {q.device.type for q in bf16.model.parameters()} == {torch.device(device).type}
    logits = bf16.local_logits(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16 and logits.device.type == torch.device(device).type
    got = _topk_batch(p, bf16, samples)
    n_pos = top1 = overlap = 0
    for a, b in zip(got, ref):
        assert a.values.device.type == "cpu" and torch.equal(a.aligned_mask, b.aligned_mask)
        assert int(a.ids.max()) < p["n_tok"]                                  # padding never in
        for t in b.aligned_mask.nonzero().squeeze(1).tolist():
            n_pos += 1
            top1 += int(a.ids[t, 0] == b.ids[t, 0])
            overlap += len(set(a.ids[t].tolist()) & set(b.ids[t].tolist()))
            # bf16 logits carry 8 mantissa bits: the z-scores agree to a few hundredths
            assert torch.allclose(a.values[t], b.values[t], atol=0.1, rtol=0.05)
        assert abs(a.teacher_ce - b.teacher_ce) <= 0.02 * abs(b.teacher_ce) + 0.02
    # near-ties swap under bf16 rounding: most, not all, top-1 ids agree
    assert n_pos > 50 and top1 >= 0.9 * n_pos and overlap >= 0.85 * K * n_pos, (
        n_pos, top1, overlap)


def test_hf_backend_cpu_bf16_matches_fp32(padded):
    _bf16_matches_fp32(padded, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hf_backend_cuda_bf16_matches_cpu_fp32(padded):
    _bf16_matches_fp32(padded, "cuda")
