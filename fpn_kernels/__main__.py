"""``python -m fpn_kernels {bench,check,profile,backends} [...]``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": ("fpn_kernels.cli.bench", "time every backend vs eager and torch.compile"),
    "check": ("fpn_kernels.cli.check", "the correctness matrix against eager"),
    "profile": ("fpn_kernels.cli.profile", "GPU kernel resources and the HBM roofline model"),
    "backends": ("fpn_kernels.cli.backends", "which backends this install has, and why not"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m fpn_kernels {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:9s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
