"""The public face: ``import attent_scale`` is cheap, and every name it exports imports."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

HEAVY = ("deepspeed", "transformers", "streaming")


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_import_alone_loads_no_framework():
    # A fresh interpreter: this test process has long imported all of them.
    loaded = json.loads(run_python(
        "import sys, json, attent_scale\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"))
    assert loaded == []


def test_the_lazy_import_check_sees_a_loaded_framework():
    # The same probe after one export is used: it must see the framework that export needs
    # (otherwise the check above could pass for nothing).
    loaded = json.loads(run_python(
        "import sys, json, attent_scale\n"
        "attent_scale.initialize\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"))
    assert "deepspeed" in loaded


def test_every_exported_name_imports():
    import attent_scale
    assert attent_scale.__all__ and len(set(attent_scale.__all__)) == len(attent_scale.__all__)
    for name in attent_scale.__all__:
        value = getattr(attent_scale, name)
        assert value is not None, name
        assert name in dir(attent_scale)
        # The name is the module's own object, not a stand-in.
        module = sys.modules[value.__module__] if hasattr(value, "__module__") else None
        if module is not None and module.__name__.startswith("attent_scale."):
            assert getattr(module, name) is value, name
    namespace: dict = {}
    exec("from attent_scale import *", namespace)
    assert set(attent_scale.__all__) <= set(namespace)


def test_an_unknown_name_is_an_attribute_error():
    import attent_scale
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        attent_scale.Trainer  # noqa: B018
    assert not hasattr(attent_scale, "_EXPORTS_MISSING")
