"""Built engines: the one-file engine format (weights plus the header that says how and where they were built)."""
