"""The package's shape, read from its source with ast: the teacher's core stays pure (no
collectives, DeepSpeed, streaming or transformers in it), no import cycle among attent_scale's
modules, and no test, tool or example reaches for a private (``_``-prefixed) name."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "attent_scale"
PURE = ["config.py", "schedules.py", "policy.py", "signals.py", "partition.py", "teacher.py",
        "sharded_select.py", "grad_norm.py"]
FORBIDDEN = ("torch.distributed", "deepspeed", "streaming", "transformers")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports_no_framework(name):
    bad = sorted(m for m in imported_modules(PKG / name)
                 if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{name} imports {bad}"


def test_only_comm_and_the_fsdp_adapter_use_torch_distributed():
    # The FSDP2 adapter's whole job is torch.distributed's fully_shard and checkpoint API; every
    # other module reaches ranks through comm.py.
    users = sorted(p.name for p in PKG.glob("*.py")
                   if any(m.startswith("torch.distributed") for m in imported_modules(p)))
    assert users == ["comm.py", "fsdp_plugin.py"], users


# ---- the import graph ---------------------------------------------------------------------------

def module_name(path: Path, package: Path) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside any function.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module (else of
    ``pkg`` itself); relative imports are resolved against the importing module's package. The
    package ``__init__`` exports names lazily (importlib on first use), which is no import edge.
    """
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        # A module's own package: itself for an __init__, else its parent.
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                # `import pkg.a.b` imports pkg.a.b (and its parents, whose __init__s are lazy).
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph(PKG)
    # The graph is really read: the adapters import the teacher at work (a cycle check on an
    # empty graph would pass for nothing).
    assert "attent_scale.teaching" in graph["attent_scale.deepspeed_plugin"]
    assert "attent_scale.teaching" in graph["attent_scale.hf_trainer"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    # The shape of the old loop.py <-> pretrain.py cycle: one side imports inside a function.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "loop.py").write_text("from .pretrain import build\n")
    (pkg / "pretrain.py").write_text("def main():\n    from . import loop\n")
    (pkg / "leaf.py").write_text("import pkg.loop\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.loop": {"pkg.pretrain"}, "pkg.pretrain": {"pkg.loop"},
                     "pkg.leaf": {"pkg.loop"}}
    assert find_cycle(graph) == ["pkg.loop", "pkg.pretrain", "pkg.loop"]
    (pkg / "pretrain.py").write_text("def main():\n    import json\n")
    assert find_cycle(import_graph(pkg)) is None


# ---- private names ------------------------------------------------------------------------------

def private_imports(source: str, package: str = "attent_scale") -> list[tuple[int, str]]:
    """(line, name) of every import in ``source`` of a ``_``-prefixed name or module of
    ``package``, at module level or inside a function, in line order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names
                     if a.name.split(".")[0] == package and
                     any(part.startswith("_") for part in a.name.split("."))]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == package:
            private_module = any(part.startswith("_") for part in node.module.split("."))
            names = [f"{node.module}.{a.name}" for a in node.names
                     if private_module or a.name.startswith("_")]
        else:
            continue
        found += [(node.lineno, n) for n in names]
    return sorted(found)


def test_no_test_tool_or_example_imports_a_private_name():
    # Users and our own jobs run the same public code path; a test or tool that needs a private
    # helper shows a public piece missing.
    files = [p for d in ("tests", "tools", "examples") for p in sorted((ROOT / d).glob("*.py"))]
    assert len(files) > 40  # the scan really reads the files
    found = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in files
             for line, name in private_imports(p.read_text())]
    assert not found, "private names imported:\n" + "\n".join(found)


def test_the_private_import_scan_finds_each_form():
    source = ("from attent_scale.loop import _single_process_env, prepare\n"
              "import attent_scale._impl\n"
              "def f():\n    from attent_scale import _EXPORTS\n"
              "from attent_scale.loop import single_process_env\n"
              "from other import _x\n")
    assert private_imports(source) == [(1, "attent_scale.loop._single_process_env"),
                                       (2, "attent_scale._impl"), (4, "attent_scale._EXPORTS")]
