"""Measuring scripts for the GPU device: not product code, and nothing in the product imports them (README.md)."""
