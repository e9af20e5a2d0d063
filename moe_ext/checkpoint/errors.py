"""The one error type of moe_ext.checkpoint: a one-line message naming the tensor or file
at fault and what to do about it."""


class CheckpointError(ValueError):
    """Bad checkpoint input (missing/extra/misshapen tensor, unreadable file, unknown family)."""
