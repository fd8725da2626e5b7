"""edgemix: an edge deployment compiler for MLP-Mixer vision models."""

__version__ = "0.1.0"
