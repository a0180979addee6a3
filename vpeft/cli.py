"""The ``vpeft`` command.

``vpeft fit|validate|test`` train and evaluate through LightningCLI (composable YAML from ``configs/``, e.g.
``vpeft fit -c configs/trainer/cpu.yaml -c configs/data/caltech101.yaml -c configs/method/lora.yaml``);
``vpeft quickstart`` runs the offline few-shot benchmark; ``vpeft aggregate RUNS...`` turns result cards into
paper-style tables; ``vpeft demo`` the small offline demo; ``vpeft methods``
lists the registered PEFT methods.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# No "predict": the data module serves no prediction split, and the test split is reachable only through "test".
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _lightning(argv: list[str]) -> int:
    try:
        from .modules.lightning_cli import run
    except ImportError as e:  # Lightning is an optional dependency of vpeft
        print(f"vpeft {argv[0]} needs Lightning: pip install 'vpeft[lightning]' ({e})", file=sys.stderr)
        return 2
    run(argv)
    return 0


#: ``vpeft quickstart --task <name>``: the module whose ``main(argv)`` runs it.
QUICKSTART_TASKS = {"classification": ".quickstart", "points": ".quickstart_points",
                    "segmentation": ".quickstart_segmentation"}


def _quickstart(argv: list[str]) -> int:
    # --task picks the quickstart; every other option belongs to that quickstart's own parser (and its -h).
    task, rest, i = "classification", [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--task" and i + 1 < len(argv):
            task, i = argv[i + 1], i + 2
            continue
        if a.startswith("--task="):
            task = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if task not in QUICKSTART_TASKS:
        print(f"vpeft quickstart: --task must be one of {sorted(QUICKSTART_TASKS)}, got {task!r}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(QUICKSTART_TASKS[task], __package__)
    except ImportError as e:
        print(f"vpeft quickstart --task {task} is not available in this installation ({e})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vpeft`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Training subcommands are LightningCLI's (it owns their options and -h); dispatch before argparse sees them.
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _lightning(argv)
    if argv and argv[0] == "quickstart":
        return _quickstart(argv[1:])
    if argv and argv[0] == "aggregate":  # owns its options and -h
        from .protocols.aggregate import main as aggregate_main

        return int(aggregate_main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="vpeft", description="Parameter-efficient fine-tuning for vision models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("fit", "train with LightningCLI (vpeft fit -c trainer.yaml -c data.yaml -c method.yaml)"),
                       ("validate", "evaluate on the validation split (LightningCLI)"),
                       ("test", "evaluate on the test split, e.g. --ckpt_path last.ckpt (LightningCLI)"),
                       ("quickstart", "offline few-shot benchmark on Fashion-MNIST with a self-pretrained ViT "
                                      "(--task points | segmentation: synthetic point clouds / scikit-image images)"),
                       ("aggregate", "paper-style tables (few-shot, base-to-new, cross-dataset) from result cards")):
        sub.add_parser(name, help=text, add_help=False)
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
