"""Accuracy evaluation: the official SQuAD v1.1 / v2.0 scoring rules."""
