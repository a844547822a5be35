"""Interop tests against Go's hashicorp/yamux (see conftest.py)."""
