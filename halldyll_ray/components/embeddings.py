"""Embedding generation through the cache tiers (SPEC §4.6): local model or remote embedder."""

from __future__ import annotations

import asyncio
import hashlib
import unicodedata
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from halldyll_ray import validation
from halldyll_ray.embedding import TextEncoder
from halldyll_ray.errors import Unavailable
from halldyll_ray.storage.cache import TieredCache

#: A remote embedder (the Ray Serve Embedding deployment): texts in, n x dimension out.
RemoteEmbedder = Callable[[list[str]], Awaitable[np.ndarray]]
#: How long a cached embedding lives, in seconds (a week).
EMBEDDING_CACHE_TTL_S = 7 * 86_400


class ModelVectors(np.ndarray):
    """Vectors that remember which model made them (``model_id``): a float32 ndarray in
    every other respect, slices and rows included. A chunk write or a search names that
    model to PostgreSQL, which refuses vectors of any other model than the one it searches
    (migration 0010): a process that embedded with a model just replaced by a re-embedding
    cannot store or search with vectors of the wrong kind."""

    model_id: str | None = None

    def __array_finalize__(self, obj: object) -> None:
        self.model_id = getattr(obj, "model_id", None)


def tag_vectors(vectors: np.ndarray, model_id: str) -> ModelVectors:
    """``vectors`` (no copy) marked as made by ``model_id``."""
    tagged = np.asarray(vectors).view(ModelVectors)
    tagged.model_id = model_id
    return tagged


def model_of(vectors: np.ndarray) -> str | None:
    """The model that made ``vectors`` (from :meth:`Embeddings.embed`), or None if unknown."""
    return getattr(vectors, "model_id", None)


class Embeddings:
    """Embeddings of texts, cached by model and text hash.

    Args:
        encoder: The local model; it embeds when no ``remote`` is given, and always counts
            tokens for the context builder.
        cache: The LRU + Redis tiers.
        remote: Replaces the local model for vectors (the Embedding deployment's handle).
    """

    def __init__(
        self, encoder: TextEncoder, cache: TieredCache, remote: RemoteEmbedder | None = None
    ) -> None:
        self.encoder = encoder
        self.cache = cache
        self.remote = remote
        #: Models this installation used before (the source of the last re-embedding): the
        #: cache may still hold their vectors of a user's texts, which an erasure removes too.
        self.retired_models: set[str] = set()

    def cache_keys(
        self,
        texts: Sequence[str],
        *,
        normalized: bool = False,
        encoder: TextEncoder | None = None,
        model_id: str | None = None,
    ) -> list[str]:
        """The cache keys of the embeddings of ``texts`` (model id and a hash of the
        NFKC-normalised text), for this encoder's model or ``model_id``."""
        if not normalized:
            texts = [unicodedata.normalize("NFKC", text) for text in texts]
        model = model_id or (encoder or self.encoder).model_id
        return [
            "emb:"
            + model
            + ":"
            + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]
            for text in texts
        ]

    def erasure_keys(self, texts: Sequence[str]) -> list[str]:
        """The cache keys of the embeddings of ``texts`` under the current model and every
        retired one: what an erasure removes for a user's stored texts."""
        keys = self.cache_keys(texts)
        for model in sorted(self.retired_models - {self.encoder.model_id}):
            keys += self.cache_keys(texts, model_id=model)
        return keys

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``: float32, shape (len(texts), dimension), L2-normalised.

        Texts are NFKC-normalised first, for documents and queries alike, so that other
        Unicode forms of the same words (full-width letters, ligatures, composed accents)
        embed the same; the default model's tokenizer does not fold them. The result is a
        :class:`ModelVectors` naming the model that made it.

        Raises:
            InvalidInput: ``texts`` is not a list of strings (a lone string was embedded
                character by character), or one holds a NUL or a lone surrogate (field
                ``texts``).
        """
        texts = [
            unicodedata.normalize("NFKC", validation.text(text, "texts"))
            for text in validation.items(texts, "texts")
        ]
        # One read of the encoder and remote: a re-embedding that ends during this call
        # swaps both (Reembedding.switch_to), and the vectors must be of one model.
        encoder, remote = self.encoder, self.remote
        dim = encoder.dimension
        keys = self.cache_keys(texts, normalized=True, encoder=encoder)
        cached = await self.cache.get_many(keys, kind="embedding")
        out = np.empty((len(texts), dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, value in enumerate(cached):
            if value is not None and len(value) == dim * 4:
                out[i] = np.frombuffer(value, dtype=np.float32)
            else:
                missing.setdefault(texts[i], []).append(i)
        if missing:
            fresh_texts = list(missing)
            if remote is not None:
                vectors = await remote(fresh_texts)
            else:
                vectors = await asyncio.to_thread(encoder.encode, fresh_texts)
            if vectors.shape != (len(fresh_texts), dim):
                raise Unavailable(f"the embedder returned vectors of shape {vectors.shape}")
            to_store = []
            for text, vector in zip(fresh_texts, vectors, strict=True):
                for i in missing[text]:
                    out[i] = vector
                to_store.append((keys[missing[text][0]], vector.astype(np.float32).tobytes()))
            await self.cache.set_many(to_store, ttl=EMBEDDING_CACHE_TTL_S)
        return tag_vectors(out, encoder.model_id)

    async def embed_uncached(self, texts: Sequence[str]) -> np.ndarray:
        """Like :meth:`embed` (same normalisation, same vectors) but without the cache: what a
        re-embedding uses for stored chunks, which would otherwise fill the cache with every
        text of every user (and leave keys of a model an erasure does not know of)."""
        texts = [unicodedata.normalize("NFKC", text) for text in texts]
        encoder, remote = self.encoder, self.remote
        if not texts:
            return tag_vectors(np.empty((0, encoder.dimension), np.float32), encoder.model_id)
        if remote is not None:
            vectors = await remote(texts)
        else:
            vectors = await asyncio.to_thread(encoder.encode, texts)
        if vectors.shape != (len(texts), encoder.dimension):
            raise Unavailable(f"the embedder returned vectors of shape {vectors.shape}")
        return tag_vectors(vectors.astype(np.float32, copy=False), encoder.model_id)
