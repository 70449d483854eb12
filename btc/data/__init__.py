"""Data: discovery, decoding, manifest, leakage-free splitting, caching and synthetic data."""
