"""Operator tools beside the server: load generation and tuning."""
