"""The one error type of moe_ext.checkpoint: a one-line message naming the tensor or file
at fault and what to do about it."""

from moe_ext.errors import MoeExtError


class CheckpointError(MoeExtError):
    """Bad checkpoint input (missing/extra/misshapen tensor, unreadable file, unknown family)."""
