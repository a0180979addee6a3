"""The ``vpeft`` command. ``vpeft demo`` runs the offline demo; training subcommands arrive with Lightning."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vpeft`` console script."""
    parser = argparse.ArgumentParser(prog="vpeft", description="Parameter-efficient fine-tuning for vision models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo: self-pretrain a tiny ViT, adapt it with PEFT methods")
    demo.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    demo.add_argument("--shots", type=int, default=10, help="labelled images per target class (default: 10)")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("methods", help="list registered PEFT methods")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(args.out, args.shots, args.seed)
    elif args.command == "methods":
        import vpeft

        print("\n".join(vpeft.list_methods()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
