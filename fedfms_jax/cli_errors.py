"""One-line errors for the command-line tools.

Bad input (a config field that does not exist, a missing weights directory, a work dir
made by another config, ...) ends the program with a single line on stderr and exit
code 2, before anything in an existing work dir is touched.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_OUT_OF_MEMORY = 4


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class HelpRequested(Exception):
    """`--help` was given: the help text is printed to stdout, exit code 0."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


class DivergedError(Exception):
    """Training produced a non-finite loss: reported as one line, exit code 3."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def usage_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, including the data package's own."""
    types: list[type[BaseException]] = [UsageError]
    try:
        from fedfms_jax.data import DataError  # missing manual files, unknown federation
        types.append(DataError)
    except Exception:  # the data package may not define it
        pass
    try:
        from fedfms_jax.data.assets import AssetError
        types.append(AssetError)
    except Exception:
        pass
    return tuple(types)


def _config_args(argv: Sequence[str]) -> list[str]:
    """The --config and --config.x=v arguments of argv, as given."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config"):
            out.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append(argv[i + 1])  # `--config NAME` given as two arguments
    return out


def run_cli(main: Callable[[Sequence[str]], int], argv: Sequence[str], prog: str) -> int:
    """Run `main(argv)`; turn bad input into one line + exit 2, and --help into exit 0."""
    try:
        return int(main(argv) or 0)
    except HelpRequested as help_:
        print(help_.text, end="")
        return 0
    except usage_error_types() as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except DivergedError as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception as exc:  # XLA's out-of-memory error: point at the memory plan
        if "RESOURCE_EXHAUSTED" not in str(exc):
            raise
        config = " ".join(_config_args(argv)) or "--config CONFIG"
        print(f"{prog}: error: out of device memory ({_one_line(exc)[:160]}); settings that fit: "
              f"python -m fedfms_jax.plan {config} --memory-gb <GB per device>", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
