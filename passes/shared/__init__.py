"""What the passes share: the calibrated-pass machinery, masks and their plans, sparsity patterns, the OBS sweep of
SparseGPT and GPTQ, quantization grids, channel permutation, OWL's layer-wise sparsity, TEAL's greedy allocation.

May import nexus_export (never ``runtimes``).
"""
