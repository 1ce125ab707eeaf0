"""Hyperparameter search with Ray Tune + Optuna: spaces, the search, and the results store."""

from rayad.tune.search import SearchSettings, format_experiment, load_settings, run_search
from rayad.tune.space import SearchSpace, load_space, resolve_space

__all__ = ["SearchSettings", "SearchSpace", "format_experiment", "load_settings", "load_space", "resolve_space",
           "run_search"]
