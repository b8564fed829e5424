"""Integrations of fastpref with training libraries.

Nothing here is imported by ``import fastpref``: each integration is imported explicitly, e.g.
``import fastpref.integrations.trl``, and uses only fastpref's public API.
"""

# Nothing is re-exported: each integration is its own module (``trl`` needs TRL installed).
__all__: list = []
