"""tools/lowest_constraints.py: the pins of the CI's lowest-dependencies step, read from a pyproject.toml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "lowest_constraints.py"


def _tool():
    pytest.importorskip("tomllib")
    spec = importlib.util.spec_from_file_location("lowest_constraints", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_direct_dependency_pinned_to_its_lower_bound(tmp_path):
    tool = _tool()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("""[project]
name = "x"
dependencies = ["torch>=2.4", "Huggingface_Hub>=1.24,<3", "free", "z[extra] ~= 3.1 ; python_version >= '3.10'",
                "exact==0.4.3"]
[project.optional-dependencies]
test = ["pytest>=8", "z>=3.2", "pillow"]
ui = ["gradio>=5"]
""")
    assert tool.constraints(pyproject, [], {"torch"}) == ["exact==0.4.3", "huggingface-hub==1.24", "z==3.1"]
    assert tool.constraints(pyproject, ["test"], {"torch"}) == [
        "exact==0.4.3", "huggingface-hub==1.24", "pytest==8", "z==3.2"]  # the higher of two bounds
    assert "torch==2.4" in tool.constraints(pyproject, [], set())


def test_the_repos_own_bounds_resolve_to_pins():
    tool = _tool()
    pins = dict(p.split("==") for p in tool.constraints(TOOL.parents[1] / "pyproject.toml", ["test"], {"torch"}))
    assert pins["huggingface-hub"] == "1.24" and pins["transformers"] == "5.0" and "torch" not in pins
