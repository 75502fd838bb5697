"""Envelope and data-key tests."""
