"""The package's import graph: no cycles, no upward imports (tools/check_imports.py).

The checker counts imports made inside functions too; its own behaviour is tested on a small
synthetic tree, then it is run on the real package.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools" / "check_imports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "megatron_fusion" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp_path


def test_checker_finds_upward_import_inside_a_function(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "losses/__init__.py": "",
        "losses/uld.py": "def f():\n    from megatron_fusion.stages.fuse import X\n",
        "stages/__init__.py": "",
        "stages/fuse.py": "from megatron_fusion.losses import uld\nX = 1\n",
    })
    problems = _checker().check(root)
    assert any("losses/uld.py:2" in p and "upward" in p for p in problems), problems
    assert any(p.startswith("import cycle among: megatron_fusion.losses.uld, megatron_fusion.stages.fuse")
               for p in problems), problems


def test_checker_resolves_relative_imports_and_peers(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/sft.py": "from ..losses import topk\n",          # data must not import losses
        "losses/__init__.py": "",
        "losses/topk.py": "from . import _shard\n",
        "losses/_shard.py": "",
        "teachers/__init__.py": "",
        "teachers/shards.py": "import megatron_fusion.train\n",  # teachers never see the trainer
        "train.py": "",
        "newthing.py": "",
    })
    problems = _checker().check(root)
    assert any("data/sft.py:1" in p and "peer import" in p for p in problems), problems
    assert any("teachers/shards.py:1" in p and "upward" in p for p in problems), problems
    assert any("newthing" in p and "no layer" in p for p in problems), problems
    assert not any("losses/topk.py" in p for p in problems), problems
    assert not any("cycle" in p for p in problems), problems


def test_package_import_graph_is_layered_and_acyclic():
    problems = _checker().check(ROOT)
    assert problems == [], "\n".join(problems)


def test_user_facing_errors_share_one_base():
    """user_facing(e) is one isinstance: every error the user fixes derives from UserError."""
    from megatron_fusion.checkpoint import CheckpointError
    from megatron_fusion.config import ConfigError
    from megatron_fusion.convert import ConversionError
    from megatron_fusion.data.jsonl import JSONLError
    from megatron_fusion.errors import TeacherDataError, UserError, user_facing
    from megatron_fusion.train import TrainError

    kinds = [CheckpointError, ConfigError, ConversionError, JSONLError, TeacherDataError, TrainError]
    for cls in kinds:
        assert issubclass(cls, UserError), cls
    assert user_facing(ConfigError("train.steps", "must be >= 0"))
    assert user_facing(JSONLError("x.jsonl", 3, "invalid JSON"))
    assert user_facing(FileNotFoundError("x"))
    assert not user_facing(ValueError("a bug"))
    assert not user_facing(KeyError("a bug"))
