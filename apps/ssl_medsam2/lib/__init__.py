"""Adapters between MONAI Label and the ssl_medsam2 library (infer, train, scoring, strategies, routes)."""
