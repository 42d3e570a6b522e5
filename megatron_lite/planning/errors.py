"""The one error type of the planning package."""


class PlanError(ValueError):
    """Bad planning input (unknown preset, impossible layout, non-positive budget); the message is one line."""
