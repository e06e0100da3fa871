"""nexus-export: prune LLMs as graphs, lower to ONNX, run and report."""

__version__ = "0.1.0"
