"""The teacher's core stays pure: no collectives, DeepSpeed, streaming or transformers in it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "attent_scale"
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
