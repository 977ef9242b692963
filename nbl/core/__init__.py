"""The method on a model: statistics, closed forms (LMMSE map, CCA bound), surgery, accounting, checkpoints."""
