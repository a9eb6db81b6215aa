"""CPU mode: lets megatron-core 0.16.1 run on gloo when CUDA is absent.

This is the one module that touches torch/Megatron internals. ``enable()`` does nothing when
``torch.cuda.is_available()``: the GPU path never sees it. What it replaces, and why
(measured facts in the project's MEGATRON_CPU notes):

1. ``device="cuda"`` literals inside megatron-core (pipeline schedules' token counters,
   attention masks in ``transformer/utils.py``, optimizer scale tensors, clip-grad buffers,
   ``utils.py``) and ``Tensor.cuda()`` (optimizer state reload, tied embeddings under PP).
   A ``TorchFunctionMode`` rewrites a CUDA ``device=`` argument to ``cpu``, drops
   ``pin_memory``, and makes ``Tensor.cuda()`` / ``Tensor.to("cuda")`` return the tensor on CPU.
2. ``torch.cuda.current_device()`` is used as the *device* of buffers (TP mappings, DDP grad
   buffers, rotary embeddings, p2p shape exchange): it returns ``torch.device("cpu")``.
3. ``torch.cuda.synchronize`` (p2p, DDP) becomes a no-op; there is nothing to wait for.
4. RNG: the "CUDA" generator that Megatron's RNG tracker forks for tensor-parallel regions
   (dropout inside TP regions) becomes the CPU default generator:
   ``torch.cuda.get_rng_state / set_rng_state / manual_seed`` and Megatron's private
   ``_get_cuda_rng_state / _set_cuda_rng_state``. Without this, ``_set_cuda_rng_state`` queues a
   lazy CUDA call that never runs and ``tracker.fork()`` silently does not isolate the RNG.
   Because the tracked state now *is* the CPU state, the tracker's "CPU RNG state changed within
   GPU RNG context" warning is expected and is filtered.

Cost: the function mode adds Python dispatch to every torch call (~30% of a tiny CPU step).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: TorchFunctionMode | None = None
_CPU = torch.device("cpu")


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU (item 1 of the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and args[1:] and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _DropTrackerWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D401
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def enabled() -> bool:
    return _ENABLED


def enable() -> bool:
    """Activate CPU mode if CUDA is absent. Idempotent. Returns True when active."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    torch.cuda.current_device = lambda: _CPU  # item 2
    torch.cuda.synchronize = lambda device=None: None  # item 3
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # item 4
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all itself (recursion).
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))

    # Megatron warns at import that TE/apex are absent and it falls back to torch: expected here.
    for pattern in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._set_cuda_rng_state = _set_rng_state
    mp_random._get_cuda_rng_state = _get_rng_state
    logging.getLogger(mp_random.__name__).addFilter(_DropTrackerWarning())

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays pushed for the life of the process
    _ENABLED = True
    return True
