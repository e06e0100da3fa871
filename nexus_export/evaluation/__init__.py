"""Scoring a program: perplexity, the evaluation cache, zero-shot accuracy through lm-eval, activation statistics.

May import the ground floor, ``data``, ``weights``, ``graph``, ``models`` and ``engine``.
"""
