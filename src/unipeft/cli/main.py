"""The ``unipeft`` command line: train, eval, merge, methods, inspect (and convert, see :mod:`unipeft.cli.convert`).

    unipeft train configs/sst2_lora.yaml [key=value ...]
    unipeft eval --model minilm --task sst2 --adapter runs/sst2_lora/adapter [--merged]
    unipeft merge --model minilm --task sst2 --adapter runs/sst2_lora/adapter --out merged/
    unipeft combine --model minilm --adapter a/ --adapter b/ --weights 0.7 0.3 --method cat --out ab/
    unipeft methods
    unipeft inspect llama-7b --method lora

Bad input (an unknown task, method, model or key) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from unipeft.cli import (bench_cmd, combine_cmd, convert, eval_cmd, inspect_cmd, merge_cmd, methods_cmd, search_cmd,
                         serve_cmd, train_cmd)

EXIT_USAGE = 2
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="unipeft", description="Parameter-efficient fine-tuning as points in "
                                     "He et al.'s unified design space.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train_cmd, eval_cmd, merge_cmd, methods_cmd, inspect_cmd, convert, combine_cmd, bench_cmd, search_cmd,
                   serve_cmd):
        module.add_parser(subparsers)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """Warnings everywhere; training progress (evaluations, checkpoints) from unipeft.train unless ``quiet``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    train_level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.getLogger("unipeft").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("unipeft.train").setLevel(train_level)
    if not verbose:  # transformers' load reports (e.g. the new head's weights) are expected here
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own errors (exit 2) and --help (exit 0)
        return int(exit_.code or 0)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.run(args)
    except (ValueError, OSError, NotImplementedError) as err:  # bad input: a value, a file, an unsupported option
        if args.traceback:
            raise
        print(f"unipeft {args.command}: error: {_first_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"unipeft {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - anything else is still one line, not a traceback
        if args.traceback:
            raise
        print(f"unipeft {args.command}: error: {type(err).__name__}: {_first_line(err)} "
              "(rerun with --traceback for details)", file=sys.stderr)
        return EXIT_FAILURE


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
