"""How the data tools report bad input: :class:`DataError` (defined with the package's other error types in
``megatron_lite.errors``) as ``error: ...`` and exit status 2."""

from megatron_lite.errors import DataError, first_line

__all__ = ["DataError", "first_line", "run_cli"]


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
