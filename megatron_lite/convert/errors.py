"""The exception checkpoint conversion raises for bad input."""

from megatron_lite.errors import CheckpointError


class ConvertError(CheckpointError):
    """Bad input to a checkpoint conversion: one line naming the file, tensor, key or value and what was expected.

    ``tools/convert_checkpoint.py`` prints it as ``error: ...`` and exits with status 2 (``errors.exit_status``),
    without a traceback.
    """
