"""The `sparselora` command line: one argparse tree that owns every sub-command and the logging
set-up. Sub-commands: train, eval, export, estimator build, presets, env, demo
(`run_commands.py`) and flops, bench, composed (`perf_commands.py`)."""

from __future__ import annotations

import argparse
import logging
import sys

from sparselora.cli import perf_commands, run_commands
from sparselora.config import ConfigError

EPILOG = "Run `sparselora COMMAND --help` for the options of each command."


def configure_logging(verbose: bool) -> None:
    """The format and level every `sparselora` sub-command logs with."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparselora",
        description="Faster LoRA fine-tuning with contextual sparsity (SparseLoRA).",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_commands.register(sub)
    perf_commands.register(sub)
    _add_verbose(sub)
    return parser


def _add_verbose(subparsers: argparse._SubParsersAction) -> None:
    """`-v` after the sub-command too (`sparselora bench -v`), on every (nested) sub-command.

    Its default is SUPPRESS, so a sub-command without `-v` keeps the top-level `-v` value.
    """
    for parser in subparsers.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in nested:
            _add_verbose(action)
        if not nested:
            parser.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                help="debug logging",
            )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # overrides may follow --method / --output-dir
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if "=" not in item or item.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"sparselora: config error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # a missing or unreadable file, a bad value
        print(f"sparselora: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # an optional package this command needs is not installed
        print(f"sparselora: error: {err}; `make setup` installs every dependency", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparselora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
