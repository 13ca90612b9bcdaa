"""The `tracetape` command: dispatches to the subcommand's module, importing only that one.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int` (the exit status);
`args.after_dashdash` is the argv after the first `--` (None without one), for commands that run a command. A
`CliError` raised by a subcommand becomes one line on stderr (`tracetape: ...`) and exit status 2, or its
own `exit_code`; with `--json` the same message is printed as `{"error": ...}` on stdout. A reader that
closes stdout early (`tracetape show RUN | head -1`) ends the command quietly with status 141 (128 + SIGPIPE,
what a shell reports for a command killed by a broken pipe), nothing on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from tracetape.errors import CliError, stdout_to_devnull

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tracetape.instrumentation.runner", "run a command with recording on: tracetape run -- CMD ..."),
    "collector": ("tracetape.collector.service", "run the collector sidecar (OTLP in, LMDB store, forward)"),
    "up": ("tracetape.replayer.up", "run the collector and the replayer together"),
    "runs": ("tracetape.collector.inspect", "list recorded runs"),
    "keys": ("tracetape.collector.keys_cmd", "hash an API key (read on stdin) for the auth config"),
    "show": ("tracetape.collector.inspect", "show one run: status, replayability, timeline"),
    "replayer": ("tracetape.replayer.service", "run the replayer service"),
    "replay": ("tracetape.replayer.replay_cmd", "replay a recorded run"),
    "diff": ("tracetape.replayer.diff_cmd", "compare two runs step by step"),
    "export": ("tracetape.replayer.transfer", "export a run (jsonl, otlp-json, jaeger)"),
    "import": ("tracetape.replayer.transfer", "import an exported run"),
    "step": ("tracetape.replayer.step_cmd", "re-issue one recorded call live and diff the answer"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: tracetape COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "tracetape COMMAND --help shows a command's options."]
    return "\n".join(lines)


EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # flush here, where a broken pipe can still be caught, not at interpreter exit
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:  # the reader of stdout went away (`| head -1`): not an error of this command
        stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args_in[0] in ("-V", "--version"):
        from tracetape import __version__

        print(__version__)
        return 0
    name, rest = args_in[0], args_in[1:]
    if name not in COMMANDS:
        print(f"tracetape: unknown command {name!r} (tracetape --help lists them)", file=sys.stderr)
        return 2
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"tracetape {name}", description=summary)
    add = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
    add(parser)
    args = parser.parse_args(rest)
    args.command = name
    # argparse drops a `--` that directly follows a positional; keep exactly what came after the first one
    args.after_dashdash = rest[rest.index("--") + 1:] if "--" in rest else None
    handler = getattr(module, f"run_{name}", None) or module.run
    try:
        return int(handler(args) or 0)
    except CliError as err:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(err)}))
        else:
            print(f"tracetape {name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
