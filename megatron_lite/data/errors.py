"""The one exception type the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad input to the data pipeline: a one-line message naming the file, key or value and what was expected.

    Command-line tools print it as ``error: ...`` and exit with status 2, without a traceback.
    """


def first_line(e: BaseException) -> str:
    """An exception's first message line (library messages can run to pages), or its type name when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def run_cli(main, argv=None) -> int:
    """Run a tool's ``main``; a :class:`DataError` becomes ``error: ...`` on stderr and exit status 2."""
    import sys

    try:
        return main(argv) or 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
