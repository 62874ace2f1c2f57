"""Clients of sam3d-jobs: the ``sam3d-jobs`` command line (and, later, the Python SDK)."""
