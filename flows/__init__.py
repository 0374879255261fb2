"""Prefect wiring and the command line."""
