"""Generating text: the decoding loop, sampling and the PyTorch decoders (``loop``), and text in, text out from a run
folder, a bundle, a program or a model (``text``; runtimes through the registry).

May import the ground floor, ``weights``, ``graph`` and ``models``.
"""
