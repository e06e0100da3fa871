"""The package's face: the user-facing names import from ``nexus_export`` itself, lazily, and the module paths of the
flat layout before the subpackages still import, as the very modules that replaced them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from conftest import needs_lm_eval

import nexus_export


def test_public_names_come_from_their_modules():
    from nexus_export import Program, SparseGPTPruner, generate_text, load_model
    from nexus_export.api.pruning import SparseGPTPruner as defined

    assert SparseGPTPruner is defined
    assert Program.__module__ == "nexus_export.graph.program"
    assert load_model.__module__ == "nexus_export.models.zoo" and generate_text.__module__ == "nexus_export.generate.text"
    assert {"SparseGPTPruner", "export_onnx", "Program"} <= set(dir(nexus_export))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        nexus_export.NoSuchThing


@pytest.mark.parametrize("old, new", [pytest.param(old, new, marks=needs_lm_eval) if "lm_eval" in old else (old, new)
                                      for old, new in sorted(nexus_export._MOVED.items())])
def test_flat_layout_paths_import_the_moved_module(old, new):
    assert importlib.import_module(f"nexus_export.{old}") is importlib.import_module(f"nexus_export.{new}")


def test_importing_the_package_loads_no_stage():
    code = "import sys, nexus_export; print(sorted(m for m in sys.modules if m.startswith('nexus_export.')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
