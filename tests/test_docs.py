"""The docs stand alone: every repository path that code or docs cite exists, and every
METHOD.md they cite is this repository's docs/METHOD.md."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

from sparselora.config import SparseLoRAConfig

ROOT = Path(__file__).resolve().parents[1]
TOP = ("src", "tests", "docs", "benchmarks", "configs", "examples", ".ci")
# A path as the docs write it: starts at a top-level folder, ends in a file name or a slash.
FOLDERS = "|".join(re.escape(t) for t in TOP)
PATH = re.compile(rf"(?<![\w./-])((?:{FOLDERS})/[\w./*-]*[\w/*])")
# Run folders written by the commands the docs show; they exist after the command runs.
GENERATED = re.compile(r"^runs/")


def cited_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("src", "benchmarks", "examples", "configs", "tests"):
        files += sorted(
            p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".sh")
        )
    return [p for p in files if p != Path(__file__).resolve()]  # its examples are no citations


def cited_paths(text: str) -> set[str]:
    return {m.rstrip(".") for m in PATH.findall(text)}


def test_the_path_finder_sees_what_a_reader_sees():
    text = "see `docs/METHOD.md`, src/sparselora/engine/ (the engine) and tests/engine/test_x.py."
    assert cited_paths(text) == {
        "docs/METHOD.md",
        "src/sparselora/engine/",
        "tests/engine/test_x.py",
    }


def test_every_cited_repository_path_exists():
    missing = {}
    for path in cited_files():
        for cited in sorted(cited_paths(path.read_text(errors="replace"))):
            if "*" in cited or "{" in cited or GENERATED.match(cited):
                continue
            if not (ROOT / cited).exists():
                missing.setdefault(str(path.relative_to(ROOT)), []).append(cited)
    assert not missing, f"cited paths that do not exist, by file: {missing}"


def test_method_md_means_this_repositorys():
    outside = {}
    for path in cited_files():
        if path.name == "METHOD.md":
            continue
        text = path.read_text(errors="replace")
        starts = [m.start() for m in re.finditer(r"(?<!docs/)\bMETHOD\.md", text)]
        if starts:
            outside[str(path.relative_to(ROOT))] = [text.count("\n", 0, i) + 1 for i in starts]
    assert not outside, f"METHOD.md cited other than as docs/METHOD.md (file: lines): {outside}"


MODULE = re.compile(r"(?<![\w./-])sparselora(?:\.[A-Za-z_]\w*)+")
# `sparselora.yaml` is a file beside an adapter; `sparselora.ffn_sparsity=...` a run-config key.
NOT_MODULES = {"yaml", "json"} | {f.name for f in dataclasses.fields(SparseLoRAConfig)}


def resolves(dotted: str) -> bool:
    """True if `dotted` names a module, or an attribute of one (a class, function, constant)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_the_module_resolver_rejects_moved_modules():
    assert resolves("sparselora.engine.savings.labelled_loss")
    assert resolves("sparselora.PRESETS")
    assert not resolves("sparselora.savings")
    assert not resolves("sparselora.engine.savings.no_such_function")


def cited_modules(text: str) -> set[str]:
    found = {m.rstrip(".") for m in MODULE.findall(text)}
    return {m for m in found if m.split(".")[1] not in NOT_MODULES}


def test_every_cited_module_exists():
    missing = {}
    for path in cited_files():
        if "tests" in path.relative_to(ROOT).parts:
            continue  # tests build module names of planted trees
        text = path.read_text(errors="replace")
        bad = sorted(m for m in cited_modules(text) if not resolves(m))
        if bad:
            missing[str(path.relative_to(ROOT))] = bad
    assert not missing, f"cited modules that do not exist, by file: {missing}"


def test_every_test_docs_reliability_names_exists():
    """docs/RELIABILITY.md maps each case to the tests that check it; a renamed or deleted test
    must not leave the table pointing at nothing."""
    named = set(re.findall(r"\btest_\w+", (ROOT / "docs" / "RELIABILITY.md").read_text()))
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE))
        defined.add(path.stem)  # a file cited by name
    assert len(named) > 40
    assert named <= defined, f"docs/RELIABILITY.md names unknown tests: {sorted(named - defined)}"
