"""Warnings and errors raised by pullback_manifold."""

from __future__ import annotations

import numbers


class ConvergenceWarning(UserWarning):
    """A geodesic solve did not converge for some pairs; their results are flagged."""


class ConvergenceError(RuntimeError):
    """A geodesic solve did not converge and the metric was set to ``on_failure="raise"``."""


class DecoderError(ValueError):
    """The decoder returned something the geometry cannot use (wrong shape, NaN, no derivative)."""


def is_positive_int(value) -> bool:
    """An int (numpy's included, not a bool) >= 1: the check of a count setting."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def is_positive_float(value) -> bool:
    """A finite real number (not a bool) > 0: the check of a tolerance or step setting."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < float("inf")
