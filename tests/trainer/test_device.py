"""The loop and the stages keep every tensor on the model's device (issue 13).

CPU torch has no second device, so the CPU test runs on a *virtual device*: ``VirtualDevice``
(a ``TorchDispatchMode``) plus the wrapper tensor ``OnDevice`` that reports ``device='meta'``
and holds a real CPU tensor. Every op is computed on the real tensors, so losses, autograd and
gloo collectives give real numbers, but an op that mixes an ``OnDevice`` tensor with a plain host
tensor raises ``DeviceMixError`` (stricter than CUDA, which tolerates 0-dim host operands in
elementwise ops; copies between the devices are allowed), and every read of device values to
the host (``.item()``, ``.tolist()``, ``.cpu()``) is recorded as a sync. The stages get
``StudentGroups(device=meta)``, the micro-batches come from ``data.order.rank_microbatches(...,
device=)`` (the loop's own path) and the model output is ``OnDevice``: the batch is on the host
until the loop moves it, as on a GPU rank. Results are compared with the same calls on plain CPU.

``test_stages_on_cuda`` runs the same on a real GPU (NCCL 1-rank world) and skips without one.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from megatron_fusion.local_ranks import run_on_ranks

pytestmark = [pytest.mark.dist]

VDEV = torch.device("meta")
SEQ, VOCAB, PADDED, K = 16, 96, 128, 4


class DeviceMixError(RuntimeError):
    """An op got tensors on the virtual device and on the host."""


class OnDevice(torch.Tensor):
    """A tensor on the virtual device: reports ``VDEV``, computes with the CPU tensor ``elem``."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=VDEV, requires_grad=False)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem.detach()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"{func} on the virtual device outside VirtualDevice()")

    def __repr__(self):
        return f"OnDevice({self.elem!r})"


_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default,
           torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device}
_SYNCS = {torch.ops.aten._local_scalar_dense.default}


class VirtualDevice(TorchDispatchMode):
    """Runs ops on the real tensors; raises on device mixing and on collectives over host
    tensors (as NCCL would); records device->host reads."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        on_dev = [a for a in flat if isinstance(a, OnDevice)]
        host = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, OnDevice)]
        if any(h.device == VDEV for h in host):  # torch.tensor(data, device=) skips the mode
            raise DeviceMixError(f"{func}: a real meta tensor (torch.tensor(data, device=...) "
                                 "bypasses the virtual device: build it on the host and .to() it)")
        dev_kw = kwargs.get("device")
        to_dev = dev_kw is not None and torch.device(dev_kw) == VDEV
        if to_dev:
            kwargs["device"] = torch.device("cpu")
        if func.namespace == "c10d" and host:           # the student's groups are NCCL on GPU
            raise DeviceMixError(f"{func}: a collective on a host tensor (NCCL takes device "
                                 f"tensors only; host shapes {[tuple(h.shape) for h in host]})")
        if on_dev and host and func not in _COPIES:
            raise DeviceMixError(f"{func}: operands on {VDEV} and on the host "
                                 f"(host shapes {[tuple(h.shape) for h in host]})")
        if func is torch.ops.aten.copy_.default:          # dst.copy_(src) across devices
            dst, src = args[0], args[1]
            if isinstance(src, OnDevice) and not isinstance(dst, OnDevice):
                self.syncs.append("copy_ to host")
            _host(dst).copy_(_host(src), *args[2:])
            return dst
        to_host = bool(on_dev) and func in _COPIES and dev_kw is not None and not to_dev
        if (func in _SYNCS and on_dev) or to_host:     # a host read of device values
            self.syncs.append(str(func))
        keep = {id(a.elem): a for a in on_dev}
        unwrapped_args, unwrapped_kwargs = tree_map(
            lambda a: a.elem if isinstance(a, OnDevice) else a, (args, kwargs))
        out = func(*unwrapped_args, **unwrapped_kwargs)
        if to_host or not (on_dev or to_dev):
            return out

        def wrap(t):
            if not isinstance(t, torch.Tensor) or isinstance(t, OnDevice):
                return t
            kept = keep.get(id(t))
            return OnDevice(t) if kept is None else kept
        return tree_map(wrap, out)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.elem if isinstance(t, OnDevice) else t


# --- synthetic data: SFT samples, preference pairs, teachers (host tensors, as the readers give) --

def _sample(g: torch.Generator, sid: int) -> dict:
    tokens = torch.randint(0, VOCAB, (SEQ,), generator=g)
    loss_mask = torch.zeros(SEQ, dtype=torch.float32)
    loss_mask[SEQ // 3:SEQ - 2] = 1.0
    return {"tokens": tokens, "labels": torch.roll(tokens, -1), "loss_mask": loss_mask,
            "sample_id": sid}


class _SFTData:
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(1)
        self.items = [_sample(g, 100 + i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _PairData(_SFTData):
    file_hash, dataset_hash, seq_len = "f" * 16, "d" * 16, SEQ

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(2)
        self.items = []
        for i in range(n):
            c, r = _sample(g, 0), _sample(g, 0)
            item = {f"chosen_{k}": c[k] for k in ("tokens", "labels", "loss_mask")}
            item.update({f"rejected_{k}": r[k] for k in ("tokens", "labels", "loss_mask")})
            item["sample_id"] = 200 + i
            self.items.append(item)

    @property
    def sample_ids(self):
        return [it["sample_id"] for it in self.items]


class _Teacher:
    """Deterministic top-K per sample id, on the host (like OfflineTeacher / OnlineTeacher)."""

    def __init__(self, name: str, seed: int, logprobs: bool = False):
        self.name, self.seed, self.logprobs = name, seed, logprobs

    def fetch(self, sample_ids: torch.Tensor, seq_len: int):
        vals, ids, aligned, ce = [], [], [], []
        for sid in sample_ids.tolist():
            g = torch.Generator().manual_seed(self.seed * 1000 + sid)
            vals.append(torch.randn(seq_len, K, generator=g).sort(-1, descending=True).values)
            ids.append(torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(seq_len)]))
            aligned.append(torch.rand(seq_len, generator=g) > 0.2)
            ce.append(torch.rand((), generator=g) * 3)
        out = (torch.stack(vals), torch.stack(ids), torch.stack(aligned), torch.stack(ce).float())
        if self.logprobs:   # fuse.loss=hybrid: top-K log-probs (descending, mass < 1)
            return out + (torch.log_softmax(out[0] * 2, -1) - 0.3,)
        return out


def _matches():
    """A partial one-to-one teacher -> pivot map per teacher (teacher vocab = VOCAB here)."""
    from megatron_fusion.teachers.vocab_match import VocabMatch

    out = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        t_ids = torch.randperm(VOCAB, generator=g)[:VOCAB * 2 // 3].sort().values
        out.append(VocabMatch(t_ids, torch.randperm(VOCAB, generator=g)[:t_ids.numel()],
                              VOCAB, VOCAB, "t", "p"))
    return out


def _configs(tmp: str, data: _PairData):
    from megatron_fusion.config import (Config, FPOConfig, FuseConfig, ModelConfig, RunConfig,
                                        TeacherConfig, TrainConfig)
    from megatron_fusion.teachers.shards import LogprobHeader, SourceLogprobStore

    common = dict(run=RunConfig(dir=tmp), model=ModelConfig(seq_length=SEQ, vocab_size=VOCAB),
                  train=TrainConfig(global_batch=4, micro_batch=2))
    fuse = {w: Config(stage="fuse", fuse=FuseConfig(
        teachers=[TeacherConfig(name="tA"), TeacherConfig(name="tB", weight=2.0)], k=K,
        weighting=w), **common) for w in ("uniform", "avgCE")}
    fuse["hybrid"] = Config(stage="fuse", fuse=FuseConfig(
        teachers=[TeacherConfig(name="tA", tokenizer="(synthetic)"),
                  TeacherConfig(name="tB", tokenizer="(synthetic)", weight=2.0)], k=K,
        weighting="avgCE", loss="hybrid", tail_bucket=True, lambda_matched="adaptive",
        lambda_unmatched="adaptive"), **common)
    paths = []
    for j, name in enumerate(("s1", "s2")):
        g = torch.Generator().manual_seed(10 + j)
        recs = [(sid, float(-30 * torch.rand((), generator=g)), 10,
                 float(-30 * torch.rand((), generator=g)), 12) for sid in data.sample_ids]
        path = f"{tmp}/{name}.logp"
        SourceLogprobStore.write(path, LogprobHeader(source=name, source_tokenizer_hash="t",
                                                     dataset_hash=data.file_hash), recs)
        paths.append(path)
    fpo = Config(stage="fpo", fpo=FPOConfig(sources_logprobs=paths, fusion="max_margin"), **common)
    return fuse, fpo


# --- one stage, driven as the loop drives it -----------------------------------------------------

def _check_on(t: torch.Tensor, device: torch.device, what: str) -> None:
    assert t.device == device, f"{what} is on {t.device}, the model's device is {device}"


def _drive(stage, cfg, groups, data, collate_fn, mode=None) -> dict:
    """rank_microbatches(device=) -> prepare_step -> loss_func + backward per micro-batch ->
    _reduce_reports; checks every tensor the stage hands back is on ``groups.device``."""
    from megatron_fusion.data.order import SampleOrder, rank_microbatches
    from megatron_fusion.train import _reduce_reports

    dev = groups.device
    syncs = (lambda: len(mode.syncs)) if mode is not None else (lambda: 0)
    micro = rank_microbatches(data, SampleOrder(len(data), 0), 0, cfg, 1, 0, collate_fn,
                              device=dev)
    for mb in micro:
        for k, v in mb.items():
            if torch.is_tensor(v) and k != "sample_id":
                _check_on(v, dev, f"micro-batch {k!r}")
    n0 = syncs()
    stage.prepare_step(micro, groups)
    prepare_syncs = syncs() - n0
    for mb in micro:
        for j, t in enumerate(mb.get("teachers", [])):
            for k in ("values", "ids", "mask", "ce", "logp", "mids", "hmask"):
                if torch.is_tensor(t[k]):
                    _check_on(t[k], dev, f"teacher {j} {k}")
        for k in ("ref", "sources"):
            if k in mb:
                _check_on(mb[k], dev, f"micro-batch {k!r}")
    reports, losses, counts, grads = [], [], [], []
    for i, mb in enumerate(micro):
        g = torch.Generator().manual_seed(50 + i)
        logits = torch.randn(mb["tokens"].shape[0], SEQ, PADDED, generator=g) * 3
        output = logits.to(dev).requires_grad_()          # the model's output, on its device
        loss, count, rep = stage.loss_func(mb, output)
        _check_on(loss, dev, "loss_sum")
        _check_on(count, dev, "count")                    # Megatron adds it to a device total
        for k, v in rep.items():
            _check_on(v, dev, f"report {k!r}")
        loss.backward()
        _check_on(output.grad, dev, "logits grad")
        reports.append(rep)
        losses.append(float(_host(loss.detach())))
        counts.append(int(_host(count)))
        grads.append(_host(output.grad).detach().cpu())
    n0 = syncs()
    red, stop = _reduce_reports(reports, stage.report_keys, groups, False)
    return {"red": red, "stop": stop, "losses": losses, "counts": counts, "grads": grads,
            "prepare_syncs": prepare_syncs, "reduce_syncs": syncs() - n0}


def _scores(stage_cls, groups, data, mode=None):
    """FPO's forward-only scoring stage (the reference pass): count and scores on the device."""
    from megatron_fusion.stages.fpo import collate_pairs
    from megatron_fusion.parallel import to_device

    mb = to_device(collate_pairs([data[0], data[1]]), groups.device)
    output = torch.randn(4, SEQ, PADDED, generator=torch.Generator().manual_seed(7)).to(groups.device)
    lp_sum, count, rep = stage_cls(VOCAB, groups.tp).loss_func(mb, output)
    for what, t in (("sum", lp_sum), ("count", count), ("scores", rep["scores"])):
        _check_on(t, groups.device, f"reference scores {what}")
    return _host(rep["scores"]).detach().cpu()


def _all_stages(tmp: str, groups, mode=None) -> dict:
    from megatron_fusion.stages.fpo import FPOStage, _SequenceScores, collate_pairs
    from megatron_fusion.stages.fuse import FuseStage
    from megatron_fusion.stages.sft import SFTStage
    from megatron_fusion.data.order import collate

    sft_data, pair_data = _SFTData(8), _PairData(8)
    fuse_cfgs, fpo_cfg = _configs(tmp, pair_data)
    out = {"sft": _drive(SFTStage(VOCAB, groups.tp), fuse_cfgs["uniform"], groups, sft_data,
                         collate, mode)}
    for w, cfg in fuse_cfgs.items():
        hybrid = cfg.fuse.loss == "hybrid"
        stage = FuseStage(cfg, VOCAB, groups, teachers=[_Teacher("tA", 1, hybrid),
                                                        _Teacher("tB", 2, hybrid)],
                          matches=_matches() if hybrid else None)
        out[f"fuse_{w}"] = _drive(stage, cfg, groups, sft_data, collate, mode)
    fpo = FPOStage(fpo_cfg, VOCAB, groups, dataset=pair_data)
    g = torch.Generator().manual_seed(3)
    fpo.ref = -torch.rand(len(pair_data), 2, generator=g, dtype=torch.float64) * 3  # setup's table
    out["fpo"] = _drive(fpo, fpo_cfg, groups, pair_data, collate_pairs, mode)
    out["fpo_scores"] = _scores(_SequenceScores, groups, pair_data, mode)
    return out


def _groups(device: torch.device):
    import torch.distributed as dist

    from megatron_fusion.parallel import StudentGroups

    g = dist.new_group([0])
    return StudentGroups(tp=g, pp=g, dp=g, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0,
                         dp_rank=0, device=device)


def _worker_virtual(rank, world, tmp):
    """Plain CPU (the reference), then the same on the virtual device."""
    ref = _all_stages(tmp + "/cpu", _groups(torch.device("cpu")))
    with VirtualDevice() as mode:
        got = _all_stages(tmp + "/dev", _groups(VDEV), mode)
    return ref, got


def _worker_device(rank, world, tmp):
    """On this rank's own device (rank_device(): cuda:0 with a GPU, NCCL world)."""
    from megatron_fusion.parallel import rank_device

    return _all_stages(tmp, _groups(rank_device()))


def _compare(ref: dict, got: dict, tol: float = 1e-5) -> None:
    assert ref.keys() == got.keys()
    for name in ref:
        if name == "fpo_scores":
            torch.testing.assert_close(got[name], ref[name], rtol=tol, atol=tol)
            continue
        r, g = ref[name], got[name]
        assert g["counts"] == r["counts"], name
        assert g["stop"] is False and r["stop"] is False
        for a, b in zip(g["losses"], r["losses"]):
            assert abs(a - b) <= tol * max(abs(b), 1.0), (name, a, b)
        for k, v in r["red"].items():
            assert abs(g["red"][k] - v) <= tol * max(abs(v), 1.0), (name, k, g["red"][k], v)
        for a, b in zip(g["grads"], r["grads"]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2)


def _mkdirs(tmp_path, *names):
    for n in names:
        (tmp_path / n).mkdir()
    return str(tmp_path)


def test_stages_keep_tensors_on_the_model_device(tmp_path):
    ref, got = run_on_ranks(_worker_virtual, 1, (_mkdirs(tmp_path, "cpu", "dev"),),
                            timeout_s=300)[0]
    _compare(ref, got)
    # the fusion terms are live (not a trivially zero loss) and the reduction read back once
    assert ref["fuse_uniform"]["red"]["loss/uld"] > 0 and ref["fuse_avgCE"]["red"]["loss/gld"] > 0
    assert ref["fpo"]["red"]["fpo/loss"] > 0
    hyb = ref["fuse_hybrid"]["red"]
    assert hyb["loss/matched"] > 0 and hyb["loss/unmatched"] > 0 and hyb["loss/tail"] != 0
    for name in ("sft", "fuse_uniform", "fuse_avgCE", "fuse_hybrid", "fpo"):
        assert got[name]["reduce_syncs"] == 1, (name, got[name]["reduce_syncs"])
    for name in ("fuse_uniform", "fuse_hybrid"):            # the step's global counts, once
        assert got[name]["prepare_syncs"] == 1, (name, got[name]["prepare_syncs"])
    assert got["sft"]["prepare_syncs"] == 0 and got["fpo"]["prepare_syncs"] == 0


def test_virtual_device_catches_mixing(tmp_path):
    """The harness itself: a host tensor meeting a device tensor, or a collective on a host
    tensor, raises; reads of device values are counted."""
    run_on_ranks(_worker_harness, 1, (), timeout_s=120)


def _worker_harness(rank, world):
    import torch.distributed as dist

    with VirtualDevice() as mode:
        x = torch.ones(3).to(VDEV)
        with pytest.raises(DeviceMixError):
            torch.stack([x.sum(), torch.tensor(1.0)])
        with pytest.raises(DeviceMixError):
            x + torch.ones(3)
        with pytest.raises(DeviceMixError):
            dist.all_reduce(torch.ones(3), group=dist.new_group([0]))
        dist.all_reduce(x, group=dist.new_group([0]))
        y = (x * 2).sum()
        assert isinstance(y, OnDevice) and y.device == VDEV
        assert y.item() == 6.0 and len(mode.syncs) == 1
        assert not isinstance(x.cpu(), OnDevice) and len(mode.syncs) == 2


def _worker_online_metrics(rank, world):
    import torch.distributed as dist

    from megatron_fusion.teachers.online.client import OnlineTeacher
    from megatron_fusion.parallel import TeacherGroupSpec, WorldSplit

    spec = TeacherGroupSpec("tA", first=1, ranks=1, tp=1)
    split = WorldSplit(world=2, rank=0, student=1, teachers=(spec,), bridge=None, store=None)
    with VirtualDevice() as mode:
        t = OnlineTeacher("tA", 0, split, spec, dp_rank=0, timeout_s=1.0,
                          pp_group=dist.new_group([0]), device=VDEV)
        t.wait_s, t.tokens, t.compute_s = 0.5, 300.0, 2.0     # as three fetches leave them
        got = t.pop_metrics()
        return got, t.pop_metrics(), len(mode.syncs)


def test_online_pp_metrics_on_the_device():
    """Student PP > 1: the teacher metrics' PP all-reduce runs on the device, one read per step."""
    got, after, syncs = run_on_ranks(_worker_online_metrics, 1, (), timeout_s=120)[0]
    assert got == {"wait_s": 0.5, "tokens_per_s": 150.0}
    assert after == {"wait_s": 0.0, "tokens_per_s": 0.0}
    assert syncs == 2                                          # one per pop_metrics call


@pytest.mark.gpu
def test_stages_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    got = run_on_ranks(_worker_device, 1, (_mkdirs(tmp_path, "gpu") + "/gpu",), timeout_s=300)[0]
    ref = run_on_ranks(_worker_device, 1, (_mkdirs(tmp_path, "cpu") + "/cpu",), timeout_s=300,
                       env={"CUDA_VISIBLE_DEVICES": ""})[0]
    _compare(ref, got, tol=1e-4)
