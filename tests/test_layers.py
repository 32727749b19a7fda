"""The package imports only downward (cli > perf > recipes > engine > config > presets, with
version a leaf any layer may read) and has no import cycle, imports inside functions included.

The graph is read from the source (tests/import_graph.py); the checker is itself tested on
small planted trees so that the real-tree checks cannot pass by finding nothing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from import_graph import build_graph, describe_cycle, find_cycles, layer_of, violations

SRC = Path(__file__).resolve().parents[1] / "src" / "sparselora"

# layer -> the layers it must not import (None: no sparselora module at all). "" is the package
# root, whose __init__ (the public API) imports the engine: importing it imports the engine.
FORBIDDEN = {
    "engine": {"", "recipes", "perf", "cli"},
    "recipes": {"perf", "cli"},
    "perf": {"cli"},  # perf may import recipes (model loading)
    "config": {"", "engine", "recipes", "perf", "cli"},
    "presets": None,
    "version": None,
}
LAYERS = {"", "cli", *FORBIDDEN}  # cli and the root may import anything


def layer_message(layer: str, found: list[str]) -> str:
    forbidden = FORBIDDEN[layer]
    names = [f"sparselora.{name}" if name else "sparselora" for name in sorted(forbidden or ())]
    what = ", ".join(names) if forbidden is not None else "any sparselora module"
    return f"sparselora.{layer} must not import {what}:\n  " + "\n  ".join(found)


def cycles_message(graph, cycles) -> str:
    return f"{len(cycles)} import cycle(s):\n  " + "\n  ".join(
        describe_cycle(cycle, graph) for cycle in cycles
    )


# -- the real tree -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
    return build_graph(SRC)


def test_the_graph_sees_the_real_tree(graph):
    """Guards the checks below against a wrong path or a resolver that drops every edge."""
    assert len(graph) >= 20
    assert "sparselora.engine.handle" in graph["sparselora"]
    assert "sparselora.engine.ops" in graph["sparselora.engine.blocks"]  # from engine import ops
    assert "sparselora.engine.models" in graph["sparselora.engine.handle"]  # a package


def test_every_module_is_in_a_known_layer(graph):
    """A new top-level module or package needs its place in FORBIDDEN before it can pass."""
    unknown = sorted(module for module in graph if layer_of(module) not in LAYERS)
    assert not unknown, f"modules outside the known layers {sorted(LAYERS)}: {unknown}"


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, cycles_message(graph, cycles)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downward(graph, layer):
    assert any(module.startswith(f"sparselora.{layer}") for module in graph)
    found = violations(graph, layer, FORBIDDEN[layer])
    assert not found, layer_message(layer, found)


# -- the checker, on planted trees ---------------------------------------------------------------


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """Write a `sparselora` tree of the given {relative path: source}; returns its root."""
    root = tmp_path / "sparselora"
    for relative, source in {"__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip("\n"))
    return root


def test_a_module_level_cycle_is_found_with_its_path(tmp_path):
    graph = build_graph(
        plant(
            tmp_path,
            {
                "engine/__init__.py": "",
                "engine/a.py": "from sparselora.engine.b import g\n",
                "engine/b.py": "import os\nfrom . import a\n",
                "engine/c.py": "from sparselora.engine import a\n",  # on no cycle
            },
        )
    )
    cycles = find_cycles(graph)
    assert cycles == [["sparselora.engine.a", "sparselora.engine.b", "sparselora.engine.a"]]
    message = cycles_message(graph, cycles)
    assert "sparselora.engine.a -> sparselora.engine.b (line 1" in message
    assert "-> sparselora.engine.a (line 2 of sparselora.engine.b)" in message


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    root = plant(
        tmp_path,
        {
            "cli.py": "from sparselora.perf import run\n",
            "perf/__init__.py": "",
            "perf/run.py": """
                def main():
                    from sparselora.cli import main as cli_main
                    return cli_main
            """,
        },
    )
    cycles = find_cycles(build_graph(root))
    assert cycles == [["sparselora.cli", "sparselora.perf.run", "sparselora.cli"]]


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    root = plant(
        tmp_path,
        {
            "__init__.py": "from sparselora.engine.handle import apply\n",
            "engine/__init__.py": "",
            "engine/handle.py": """
                def version():
                    from sparselora import __version__
                    return __version__
            """,
        },
    )
    assert find_cycles(build_graph(root)) == [
        ["sparselora", "sparselora.engine.handle", "sparselora"]
    ]


def test_type_checking_imports_are_not_edges(tmp_path):
    root = plant(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/handle.py": "from sparselora.engine.blocks import Block\n",
            "engine/blocks.py": """
                import typing
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from sparselora.engine.handle import Handle
                if typing.TYPE_CHECKING:
                    import sparselora.engine.handle
                else:
                    import sparselora.engine.ops
            """,
            "engine/ops.py": "",
        },
    )
    graph = build_graph(root)
    assert find_cycles(graph) == []
    assert graph["sparselora.engine.blocks"] == {"sparselora.engine.ops": [9]}  # the else runs


def test_an_engine_import_of_recipes_is_flagged(tmp_path):
    root = plant(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/flops.py": "def f():\n    import sparselora.recipes.train\n",
            "engine/ops.py": "from ..config import X\n",  # downward: allowed
            "engine/handle.py": "from sparselora import __version__\n",  # the public API
            "recipes/__init__.py": "",
            "recipes/train.py": "from sparselora.engine import ops, flops\n",
            "config.py": "",
            "presets.py": "from sparselora import config\n",
        },
    )
    graph = build_graph(root)
    assert graph["sparselora.engine.ops"] == {"sparselora.config": [1]}
    assert set(graph["sparselora.recipes.train"]) == {
        "sparselora.engine.ops",
        "sparselora.engine.flops",
    }
    assert violations(graph, "engine", FORBIDDEN["engine"]) == [
        "sparselora.engine.flops -> sparselora.recipes.train (line 2)",
        "sparselora.engine.handle -> sparselora (line 1)",
    ]
    assert violations(graph, "recipes", FORBIDDEN["recipes"]) == []
    assert violations(graph, "presets", FORBIDDEN["presets"]) == [
        "sparselora.presets -> sparselora.config (line 1)"
    ]
