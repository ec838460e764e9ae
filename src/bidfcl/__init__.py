"""Bi-level decision-focused causal learning for budgeted marketing allocation."""

__version__ = "0.1.0"
