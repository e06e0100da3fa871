"""How parameter names of a captured program map to the module names a user sees.

Capture wraps the Hugging Face model in a small module whose attribute is ``lm`` (see capture.py), so a parameter
``lm.model.layers.0.mlp.down_proj.weight`` belongs to the layer ``model.layers.0.mlp.down_proj``. ONNX initializers
keep the same names, which is how a check on an ONNX file maps weights back to layers.
"""

WRAPPER_PREFIX = "lm."


def layer_name(param_name: str) -> str:
    """The user-facing module name of a weight or bias parameter (wrapper prefix and ``.weight``/``.bias`` removed)."""
    name = param_name[len(WRAPPER_PREFIX):] if param_name.startswith(WRAPPER_PREFIX) else param_name
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
