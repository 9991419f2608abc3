"""Property modules, one per SPEC section; each registers its properties on import."""
