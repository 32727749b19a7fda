"""docs/CONFIG.md is generated from the config dataclasses, and every field is documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sparselora.cli.reference import config_reference
from sparselora.config import SparseLoRAConfig
from sparselora.perf.bench import BenchConfig
from sparselora.perf.composed import ComposedConfig
from sparselora.recipes.demo import DemoConfig
from sparselora.recipes.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = [
    type(f.default_factory()) for f in dataclasses.fields(RunConfig) if f.name != "sparselora"
]


def test_committed_config_reference_is_current():
    committed = (ROOT / "docs" / "CONFIG.md").read_text()
    assert committed == config_reference(), (
        "docs/CONFIG.md is stale: python -m sparselora.cli.reference > docs/CONFIG.md"
    )


@pytest.mark.parametrize(
    "cls", [SparseLoRAConfig, RunConfig, BenchConfig, ComposedConfig, DemoConfig, *SECTIONS]
)
def test_every_config_field_is_documented(cls):
    undocumented = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
    assert not undocumented, f"{cls.__name__}: fields without doc(): {undocumented}"


def test_reference_lists_every_run_config_key():
    text = config_reference()
    for section in dataclasses.fields(RunConfig):
        if section.name == "sparselora":
            continue
        for f in dataclasses.fields(type(section.default_factory())):
            assert f"`{section.name}.{f.name}`" in text
