"""What a run reports: report.json, report.md and report.html, their plots, model cards, and comparisons of runs.

May import the ground floor and the floors below it (never ``run``, ``api`` or the CLI).
"""
