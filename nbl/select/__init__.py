"""Which layers to replace: rankings, measured damage, plans, and the registry of selection strategies."""
