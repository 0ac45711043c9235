"""Text embeddings: the ONNX Runtime encoder and the protocol the rest of the product uses."""

from halldyll_ray.embedding.encoder import OnnxEncoder, TextEncoder, default_model_files
from halldyll_ray.embedding.merge import MergingEncoder

__all__ = ["MergingEncoder", "OnnxEncoder", "TextEncoder", "default_model_files"]
