"""The `sparselora` command line: one argparse tree, the only layer that imports everything."""

from sparselora.cli.app import main

__all__ = ["main"]
