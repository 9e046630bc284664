"""`maxdpo COMMAND [ARGS]`: one entry point for train, export, compile, generate, plot and bench; each command is
also `python -m maxdpo.COMMAND` (bench: `python -m tools.bench` in a source checkout) with the same arguments."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

COMMANDS = {
    "train": ("maxdpo.train", "train (or resume) a run: [CONFIG.yaml] [key=value ...]"),
    "export": ("maxdpo.export", "a checkpoint or run to a Hugging Face folder: SRC OUT [--dtype D]"),
    "compile": ("maxdpo.compile", "compile a run's step for a TPU/GPU topology and report its memory"),
    "generate": ("maxdpo.generate", "sample from a run or HF folder: SOURCE --prompt TEXT | --data FILE"),
    "plot": ("maxdpo.plot", "draw runs' curves: RUN [RUN ...] -o curves.png"),
    "bench": ("tools.bench", "time the train step (a source checkout's tools/bench.py)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: maxdpo COMMAND [ARGS]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()) + \
        "\n\n`maxdpo COMMAND --help` describes a command's arguments."


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"maxdpo: error: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    if module_name.startswith("tools."):  # not installed: the checkout this package was installed from
        checkout = Path(__file__).resolve().parents[1]
        if not (checkout / "tools" / "bench.py").is_file():
            print("maxdpo: error: `maxdpo bench` needs a source checkout (tools/bench.py); install with "
                  "`pip install -e .` from one", file=sys.stderr)
            return 2
        sys.path.insert(0, str(checkout))
    return importlib.import_module(module_name).main(rest)


if __name__ == "__main__":
    sys.exit(main())
