"""Implementations of the command-line tools in ``tools/`` (also installed as ``tryon-*`` commands)."""
