"""Replacements by name (``replacement.mode``): what a replaced sub-block becomes (:mod:`nbl.replace.registry`)."""
