"""Text embeddings: the ONNX Runtime encoders and the protocol the rest of the product uses."""

from halldyll_ray.embedding.encoder import OnnxEncoder, TextEncoder, default_model_files
from halldyll_ray.embedding.merge import MergingCaller, MergingEncoder
from halldyll_ray.embedding.select import EMBEDDING_MODELS, LoadedEncoder, load_encoder
from halldyll_ray.embedding.use_multilingual import UseMultilingualEncoder

__all__ = [
    "EMBEDDING_MODELS",
    "LoadedEncoder",
    "MergingCaller",
    "MergingEncoder",
    "OnnxEncoder",
    "TextEncoder",
    "UseMultilingualEncoder",
    "default_model_files",
    "load_encoder",
]
