"""Check the import graph of megatron_fusion: no cycles, no upward imports.

    python tools/check_imports.py            # prints the violations, exit 1 if any

Every ``import``/``from ... import`` of a ``megatron_fusion`` module counts, including the ones
made inside functions (a lazy import is still a dependency). The layers, lowest first:

    base      errors, config, cpu_mode, parallel, local_ranks, tokenizers, metrics, run_guard
    data      megatron_fusion.data.*          (imports base only)
    losses    megatron_fusion.losses.*        (imports base only)
    models    model, checkpoint, convert
    teachers  megatron_fusion.teachers.*      (nothing from stages or the trainer)
    stages    megatron_fusion.stages.*
    trainer   train
    entry     plan, supervise, launcher, cli

A module may import its own layer and the layers below it (``data`` and ``losses`` are peers
that do not import each other), never a layer above; the whole graph has no cycle. A module
that is in no layer is an error too, so a new module is placed on purpose.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "megatron_fusion"

# (layer name, module-name prefixes). Order = rank, lowest first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "config", "cpu_mode", "parallel", "local_ranks", "tokenizers", "metrics", "run_guard")),
    ("data", ("data",)),
    ("losses", ("losses",)),
    ("models", ("model", "checkpoint", "convert")),
    ("teachers", ("teachers",)),
    ("stages", ("stages",)),
    ("trainer", ("train",)),
    ("entry", ("plan", "supervise", "launcher", "cli")),
]
# Peers at one rank that must not import each other.
PEERS = {"data": 1, "losses": 1}


def layer_of(module: str) -> tuple[str, int] | None:
    """(layer, rank) of ``megatron_fusion.<rest>``; the package's own ``__init__`` is base."""
    rest = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    if not rest:
        return ("base", 0)
    head = rest.split(".")[0]
    for rank, (name, prefixes) in enumerate(LAYERS):
        if head in prefixes:
            return name, PEERS.get(name, rank)
    return None


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(root: Path, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported megatron_fusion module, line) for every import in ``path``."""
    module = module_name(root, path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    out.append((_longest_known(a.name, known), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_pkg, node)
            if target.split(".")[0] != PACKAGE:
                continue
            for a in node.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{target}.{a.name}"
                out.append((sub if sub in known else _longest_known(target, known), node.lineno))
    return out


def _longest_known(name: str, known: set[str]) -> str:
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) or name


def check(root: Path) -> list[str]:
    """All violations under ``root`` (the directory that holds the package)."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    known = {module_name(root, f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems: list[str] = []
    seen: set[tuple[str, str, int]] = set()
    for f in files:
        src = module_name(root, f)
        src_layer = layer_of(src)
        if src_layer is None:
            problems.append(f"{f.relative_to(root)}: module {src} is in no layer (tools/check_imports.py)")
        for dst, line in imports_of(root, f, known):
            if dst == src or dst not in known:
                continue
            graph[src].add(dst)
            dst_layer = layer_of(dst)
            if src_layer is None or dst_layer is None:
                continue  # reported once, as a module in no layer
            upward = dst_layer[1] > src_layer[1]
            peer = (dst_layer[0] != src_layer[0] and dst_layer[1] == src_layer[1]
                    and src_layer[0] in PEERS)
            if (upward or peer) and (src, dst, line) not in seen:
                seen.add((src, dst, line))
                problems.append(f"{f.relative_to(root)}:{line}: {src} ({src_layer[0]}) imports "
                                f"{dst} ({dst_layer[0]}): {'upward' if upward else 'peer'} import")
    for cycle in _cycles(graph):
        problems.append("import cycle among: " + ", ".join(cycle))
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    problems = check(root)
    for p in problems:
        print(p)
    print(f"check_imports: {len(problems)} problem(s) in {root / PACKAGE}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
