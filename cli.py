"""The `tunewise` command: planning (plan, recommend, profile) and training
(train, launch, runs, status, stop, resume, merge, build-demo).

Each group of subcommands lives with the code it drives (`advisor.cli`,
`trainer.cli`); this file only assembles them. Neither import pulls in torch,
so `tunewise plan` stays instant.
"""

from __future__ import annotations

import argparse
import os
import signal
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that went away (`| head -1`) is met here, not at exit
        return code
    except TunewiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader closed the pipe: stop quietly, like a command killed by SIGPIPE. Python would try to
        # flush stdout again at exit and print another error, so point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
