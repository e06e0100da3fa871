"""Running recipes: the recipe and its validation, the pipeline (one run, stage by stage), sweeps of runs.

May import every floor below it; the passes and runtimes only through the registry.
"""
