"""circuit-catalog: precomputed transcoder circuits, stored and queried."""

__version__ = "0.1.0"
