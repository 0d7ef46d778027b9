"""Evaluation: generation, parsing, scoring."""
