"""The `tunewise` command: planning (plan, recommend, profile) and training
(train, launch, runs, status, stop, resume, merge, build-demo).

Each group of subcommands lives with the code it drives (`advisor.cli`,
`trainer.cli`); this file only assembles them. Neither import pulls in torch,
so `tunewise plan` stays instant.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from advisor import cli as advisor_cli
    from trainer import cli as trainer_cli

    parser = argparse.ArgumentParser(
        prog="tunewise",
        description="Plan, advise and run LLM fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    advisor_cli.register(sub)
    trainer_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from advisor.errors import TunewiseError

    try:
        return int(args.func(args) or 0)
    except TunewiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
