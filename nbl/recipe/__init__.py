"""The Hydra app: the config schema and its validation, cache keys, the run state and the stages of a run."""
