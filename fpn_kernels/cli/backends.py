"""``python -m fpn_kernels backends``: what this install can run."""

from __future__ import annotations

import argparse

from .. import backend_report


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="python -m fpn_kernels backends").parse_args(argv)
    print(backend_report())
    return 0
