"""The user-facing Python API: the pruner classes users know, export and perplexity helpers, gradual pruning.

May import every floor below it; the passes and runtimes only through the registry.
"""
