"""The HTTP layer: thin handlers over the cache, one error middleware, peer checks."""
