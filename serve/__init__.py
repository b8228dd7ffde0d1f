"""Serving (installed as easympt.serve)."""
