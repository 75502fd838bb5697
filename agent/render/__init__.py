"""Rendering secrets to files: formats, atomic writers, the tmpfs guard, notification."""
