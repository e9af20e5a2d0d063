"""The base of every error moe_ext raises on purpose.

A ``MoeExtError`` is bad input or an unmet requirement that the message fully explains in
one line (problem and fix). Launchers print these as one ``error:`` line and exit 2; any
other exception is a bug (ours or a library's) and keeps its traceback. Subclasses stay
``ValueError``s so library callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations


class MoeExtError(ValueError):
    """Bad input or an unmet requirement, explained in one line (problem and fix)."""
