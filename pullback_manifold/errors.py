"""Warnings and errors raised by pullback_manifold."""

from __future__ import annotations


class ConvergenceWarning(UserWarning):
    """A geodesic solve did not converge for some pairs; their results are flagged."""


class ConvergenceError(RuntimeError):
    """A geodesic solve did not converge and the metric was set to ``on_failure="raise"``."""


class DecoderError(ValueError):
    """The decoder returned something the geometry cannot use (wrong shape, NaN, no derivative)."""
