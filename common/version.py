"""The workbench version, recorded in caches and engine files so that a newer tool recomputes what it must."""

__version__ = "0.2.0"  # 0.2: fused INT8 epilogue math (plugins/), kernel choice
