"""The run's tokenizer and datasets, from the config (all ranks read the same files).

Each JSONL file is encoded once with the pivot tokenizer and cached under the run
(``data.cache_dir``, default ``<run.dir>/cache``); a stage's training set comes from
``Stage.build_dataset`` (SFT by default, preference pairs for FPO).
"""

from __future__ import annotations

from pathlib import Path

from megatron_fusion.config import Config, ConfigError
from megatron_fusion.errors import DataError


def build_tokenizer(cfg: Config):
    """The pivot tokenizer. The tiny recipe's data (``runs/demo_data``, configs/test/tiny_cpu.yaml)
    is made here on first use; a missing file of another demo directory names the command that
    makes it."""
    from megatron_fusion.data.tiny import ensure_demo_data, missing_data_hint
    from megatron_fusion.tokenizers import load_tokenizer

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer", "must be set")
    if not Path(cfg.data.tokenizer).exists() and not ensure_demo_data(cfg.data.tokenizer):
        raise DataError(f"data.tokenizer: file not found: {cfg.data.tokenizer}"
                        f"{missing_data_hint(cfg.data.tokenizer)}")
    return load_tokenizer(cfg.data.tokenizer)


def build_dataset(cfg: Config, path: str, tokenizer, dataset_cls=None):
    """A JSONL file encoded with the pivot tokenizer, cached under the run (SFT by default)."""
    if dataset_cls is None:
        from megatron_fusion.data.sft import SFTDataset as dataset_cls

    if not path:
        raise ConfigError("data.train", "must be set")
    if not Path(path).is_file():
        raise DataError(f"data: file not found: {path}")
    cache = cfg.data.cache_dir or str(Path(cfg.run.dir) / "cache")
    return dataset_cls(path, tokenizer, cfg.model.seq_length, cache_dir=cache,
                       overflow=cfg.data.overflow)


def build_sft_dataset(cfg: Config, path: str, tokenizer):
    return build_dataset(cfg, path, tokenizer)


def build_preference_dataset(cfg: Config, tokenizer, path: str | None = None):
    """The training (or a held-out) preference file, encoded with the pivot tokenizer."""
    from megatron_fusion.data.preference import PreferenceDataset

    return build_dataset(cfg, path or cfg.data.train, tokenizer, PreferenceDataset)
