"""Key provider tests."""
