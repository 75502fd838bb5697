"""The store contract suite and per-store tests."""
