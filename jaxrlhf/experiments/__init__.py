"""Experiments: the oracle study's statistics, fits, evaluation and reports (host side)."""
