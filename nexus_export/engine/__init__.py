"""What a pass is (its validated config, context, report and result) and the calibration engine that data-driven
passes run on, block by block.

May import the ground floor, ``data``, ``weights`` and ``graph``.
"""
