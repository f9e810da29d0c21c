"""kdsl_utils: the logic behind the KDSL replication notebooks (see DESIGN.md)."""

__version__ = "0.1.0"
