"""One module per selection strategy; each registers its class (``nbl.select.registry.register``)."""
