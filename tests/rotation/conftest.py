"""The store contract suite's ``store_factory`` (every store kind), for rotation tests."""

from tests.stores.conftest import store_factory

__all__ = ["store_factory"]
