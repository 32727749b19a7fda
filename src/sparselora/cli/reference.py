"""docs/CONFIG.md, generated from the config dataclasses' field metadata (the only copy of each
field's documentation). Regenerate with `python -m sparselora.cli.reference > docs/CONFIG.md`;
a test fails when the committed file is stale."""

from __future__ import annotations

import dataclasses
import sys
import typing

from sparselora.cli.options import default_of, format_default, type_name
from sparselora.config import SparseLoRAConfig
from sparselora.perf.bench import BenchConfig
from sparselora.perf.composed import ComposedConfig
from sparselora.recipes.calibrate import CalibrateConfig
from sparselora.recipes.demo import DemoConfig
from sparselora.recipes.run_config import RunConfig

INTRO = """# Configuration reference

Generated from the field documentation in the code (`python -m sparselora.cli.reference`); do not
edit by hand. Every table is one config dataclass: its fields are the keys of a YAML file, the
`section.key=value` overrides of `sparselora train`, or the `--options` of a sub-command
(underscores become dashes; `sparselora COMMAND --help` shows the same text).
"""


def field_table(cls: type, prefix: str = "") -> str:
    """A markdown table of `cls`'s fields: key, type, default, meaning."""
    hints = typing.get_type_hints(cls)
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(default_of(f)):
            continue  # a section: its own table
        name = f"{prefix}.{f.name}" if prefix else f.name
        default = default_of(f)
        shown = "required" if default is dataclasses.MISSING else format_default(default)
        meaning = f.metadata.get("help", "").replace("|", "\\|")
        kind = type_name(hints[f.name]).replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | `{shown}` | {meaning} |")
    return "\n".join(lines)


def config_reference() -> str:
    parts = [INTRO.rstrip()]
    parts.append(
        "## `SparseLoRAConfig` (Python API, `sparselora:` section of a run config)\n\n"
        "Sparsity values are the fraction of channels removed; layers are 0-based.\n\n"
        + field_table(SparseLoRAConfig)
    )
    parts.append("## `sparselora train`: the run config\n")
    for f in dataclasses.fields(RunConfig):
        if f.name == "sparselora":
            continue
        section = type(f.default_factory())
        title = f"### `{f.name}`\n\n{f.metadata['help']}\n\n"
        parts.append(title + field_table(section, f.name))
    parts.append(
        "### `sparselora`\n\n"
        + RunConfig.__dataclass_fields__["sparselora"].metadata["help"]
        + " Default: `{preset: smollm2-135m-gsm8k}`."
    )
    parts.append(
        "## `sparselora calibrate`\n\nThe model, data, shape and estimator come from the run "
        "config (as for `train`); these are the calibration options (docs/CALIBRATE.md).\n\n"
        + field_table(CalibrateConfig)
    )
    parts.append("## `sparselora bench`\n\n" + field_table(BenchConfig))
    parts.append("## `sparselora composed`\n\n" + field_table(ComposedConfig))
    parts.append("## `sparselora demo`\n\n" + field_table(DemoConfig))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(config_reference())
