"""Pieces every stage shares: the user-error type and safe file handling."""
