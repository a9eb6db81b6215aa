"""`pip install .` with the core dependencies only (no extras) trains: a fresh venv, README's
install commands, the tiny recipe for one step.

Guards setup.py's install_requires against the training path's imports (protobuf came only
through the `wandb` extra, so SentencePiece offsets failed without it). ~1-2 minutes: the CPU
torch wheel and the rest come from pip's cache.

    PYTHONPATH=$PWD python -m pytest -q tests/test_packaging.py
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_readme import clone_head, readme_commands

# Distributions only the extras bring: none may be in the core venv (else the test proves nothing).
EXTRAS_ONLY = ("wandb", "transformers", "safetensors", "gguf", "pytest")

# Everything else the core install must do, in the installed package (not a source tree):
# import every module, and the tokenizer kinds the training path loads.
CORE_CHECK = r"""
import importlib, pkgutil, sys, tempfile
import megatron_fusion
assert "site-packages" in megatron_fusion.__file__, megatron_fusion.__file__
for m in pkgutil.walk_packages(megatron_fusion.__path__, "megatron_fusion."):
    importlib.import_module(m.name)
from megatron_fusion.tokenizers import load_tokenizer, train_byte_bpe
d = tempfile.mkdtemp()
train_byte_bpe(["12 + 30 = 42", "reverse: abc -> cba"] * 20, 300, d, name="t")
tok = load_tokenizer(d)                                 # tokenizer.json: HF tokenizers
ids, offsets = tok.encode_with_offsets("12 + 30 = 42")
assert ids and len(ids) == len(offsets)
tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi\n"   # jinja2
print("core check ok")
"""


def install_commands() -> list[str]:
    """README's `pip install ...` commands, in README order (run here with the venv's pip)."""
    return [c for c in readme_commands() if c.startswith("pip install")]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{shlex.join(cmd)} exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}"
    return p.stdout + p.stderr


@pytest.mark.slow
def test_core_install_trains_the_tiny_recipe(tmp_path):
    cmds = install_commands()
    assert any("torch==" in c for c in cmds) and cmds[-1].endswith(" ."), cmds
    src = clone_head(tmp_path / "src")                         # a clean copy: no build leftovers
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env, 120)
    for c in cmds:                                             # as README writes them, in the clone
        _run([str(venv / "bin/pip"), *shlex.split(c)[1:], "-q"], src, env, 600)
    installed = _run([str(venv / "bin/pip"), "list", "--format=freeze"], tmp_path, env, 120).lower()
    names = {line.split("==")[0] for line in installed.split()}
    assert not names & set(EXTRAS_ONLY), sorted(names & set(EXTRAS_ONLY))
    assert "megatron-fusion" in names and not any(n.startswith("nvidia-") for n in names)
    assert not list(venv.glob("lib/python*/site-packages/__editable__*"))   # a real install

    work = tmp_path / "work"                     # not the clone: `-m` would import its source
    work.mkdir()
    out = _run([str(venv / "bin/megatron-fusion"), "train", "--config",
                str(src / "configs/test/tiny_cpu.yaml"), "train.steps=1"], work, env, 600)
    assert "run runs/tiny: step 1" in out, out[-3000:]
    assert (work / "runs/tiny/checkpoints/iter_0000001").is_dir()
    assert "core check ok" in _run([str(venv / "bin/python"), "-c", CORE_CHECK], work, env, 300)
