"""The `stepsearch` command: a thin dispatcher to the sub-commands, each owned by the module that implements it.

Only the chosen sub-command's module is imported, so `stepsearch data synth` does not pay for transformers.
Each module exposes `main(argv: list[str]) -> int`. A user error (`stepsearch.errors.UserError`) ends any command
with one line and exit status 2.
"""
from __future__ import annotations

import importlib
import sys

from stepsearch.errors import report_user_errors

COMMANDS = {
    "train": ("stepsearch.train", "StePPO training (same as `python -m stepsearch.train`)"),
    "data": ("stepsearch.data.cli", "synthetic world, dataset conversion, the StepSearch data pipeline"),
    "retriever": ("stepsearch.retrieval.cli", "build a BM25/dense index, or serve one over HTTP"),
    "eval": ("stepsearch.eval", "run the search agent on QA files and report EM/F1"),
    "experiment": ("stepsearch.experiment", "the reward ablation (outcome vs +key vs full StePPO)"),
}


def _usage() -> str:
    lines = ["usage: stepsearch <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"stepsearch: unknown command '{argv[0]}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    # Sub-commands report their own user errors; this catches one that escapes them, so no command ends a user's
    # mistake in a traceback (unless `--debug` or STEPSEARCH_DEBUG=1 asks for it).
    return report_user_errors(f"stepsearch {argv[0]}", lambda: int(module.main(argv[1:]) or 0),
                              debug="--debug" in argv[1:])


if __name__ == "__main__":
    sys.exit(main())
