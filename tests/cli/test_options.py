"""Options generated from a config dataclass: one per field, typed from its hint, documented
from its metadata; and the plain-text field listing of `sparselora train --help`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from sparselora.cli.options import add_dataclass_options, dataclass_from_args, describe_fields
from sparselora.config import doc


@dataclass
class Sample:
    name: str = field(default="a", metadata=doc("The name."))
    count: int = field(default=3, metadata=doc("How many (50% more is fine)."))
    rate: float = 0.5
    flag: bool = field(default=False, metadata=doc("Switch it on."))
    items: list[str] = field(default_factory=lambda: ["x", "y"], metadata=doc("Items."))
    shapes: list[str] = field(default_factory=lambda: ["1,2"], metadata=doc("Kept whole."))
    limit: int | None = field(default=None, metadata=doc("Optional."))
    table: dict[str, float] = field(default_factory=dict, metadata=doc("A mapping."))


def parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample")
    add_dataclass_options(p, Sample, skip={"table"}, keep_commas={"shapes"}, **kwargs)
    return p


def test_defaults_come_from_the_dataclass():
    args = parser().parse_args([])
    assert dataclass_from_args(Sample, args) == Sample()


def test_each_type_parses_its_values():
    args = parser().parse_args(
        ["--name", "b", "--count", "4", "--rate", "0.25", "--flag", "--items", "p,q", "r",
         "--shapes", "3,4", "5,6", "--limit", "7"]
    )  # fmt: skip
    sample = dataclass_from_args(Sample, args, table={"k": 1.0})
    assert sample == Sample("b", 4, 0.25, True, ["p", "q", "r"], ["3,4", "5,6"], 7, {"k": 1.0})
    assert parser().parse_args(["--flag", "--no-flag"]).flag is False
    assert parser().parse_args(["--items", "p, q"]).items == ["p", "q"]


def test_rename_and_bad_values():
    p = parser(rename={"count": "n"})
    assert p.parse_args(["--n", "9"]).count == 9
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(["--count", "9"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        parser().parse_args(["--limit", "many"])  # argparse: invalid int value


def test_a_field_without_an_option_type_must_be_skipped():
    with pytest.raises(TypeError, match=r"Sample.table"):
        add_dataclass_options(argparse.ArgumentParser(), Sample)


def test_help_is_the_field_metadata_and_the_default():
    text = " ".join(parser().format_help().split())
    assert "--name NAME The name. (default: a)" in text
    assert "--count COUNT How many (50% more is fine). (default: 3)" in text
    assert "--rate RATE (default: 0.5)" in text
    assert "--flag, --no-flag Switch it on. (default: " in text
    assert "--items ITEMS [ITEMS ...] Items. (default: x, y)" in text
    assert "--limit LIMIT Optional. (default: null)" in text
    assert "--table" not in text


def test_describe_fields():
    lines = describe_fields(Sample, prefix="lora").splitlines()
    assert lines[0] == "lora.name (str, default a): The name."
    assert lines[2] == "lora.rate (float, default 0.5):"
    assert lines[3] == "lora.flag (bool, default false): Switch it on."
    assert lines[4] == "lora.items (list[str], default x, y): Items."
    assert lines[6] == "lora.limit (int | None, default null): Optional."
    assert lines[7] == "lora.table (dict[str, float], default {}): A mapping."
    assert describe_fields(Sample).startswith("name (str, default a): The name.\n")
    wrapped = describe_fields(Sample, prefix="a-rather-long-section-name", width=40).splitlines()
    assert all(len(line) <= 40 for line in wrapped)
    assert wrapped[1].startswith("    ")


@pytest.mark.parametrize(("text", "value"), [("1e3", 1000), ("+3", 3), ("1_000", 1000), ("2.0", 2)])
def test_an_int_option_takes_an_integral_number_in_any_notation(text, value):
    assert parser().parse_args(["--count", text]).count == value
    assert parser().parse_args(["--rate", "1e-4"]).rate == 1e-4


@pytest.mark.parametrize("text", ["1.5", "1e-3", "inf", "many"])
def test_an_int_option_refuses_a_fraction_naming_the_option(text, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--count", text])
    assert f"argument --count: invalid int value: '{text}'" in capsys.readouterr().err


def test_an_int_list_option_takes_integral_numbers_and_refuses_fractions(capsys):
    @dataclass
    class Steps:
        at: list[int] = field(default_factory=list, metadata=doc("Steps."))

    p = argparse.ArgumentParser(prog="steps")
    add_dataclass_options(p, Steps)
    assert p.parse_args(["--at", "1e3,2", "3"]).at == [1000, 2, 3]
    with pytest.raises(SystemExit):
        p.parse_args(["--at", "2,1.5"])
    assert "argument --at: invalid int value: '1.5'" in capsys.readouterr().err
