"""Configs of using a trained model: the vector index (HNSW graph) and the HTTP server."""
from __future__ import annotations

from dataclasses import dataclass

from fam.config.checks import Validated, choice, fail, integers, number

__all__ = ["HnswConfig", "ServeConfig", "MultiVectorIndexConfig", "SearchWorkerConfig"]


@dataclass
class HnswConfig(Validated):
    """HNSW graph parameters (FAISS names; ``fam index build --kind hnsw``)."""

    m: int = 32  # neighbours per node (graph degree); more = better recall, more memory
    ef_construction: int = 200  # candidate list size while building
    ef_search: int = 128  # candidate list size while searching (the recall/speed knob)

    def check(self, prefix: str) -> None:
        integers(self, prefix, m=1, ef_construction=1, ef_search=1)


@dataclass
class MultiVectorIndexConfig(Validated):
    """The multi-vector index (``fam index build --multivector``, fam.index.multivector)."""

    max_tokens: int = 0  # most token vectors per item; 0 = all
    pooling: str = "cluster"  # how max_tokens reduces: cluster (merge similar) | runs (contiguous)
    candidate_tokens: int = 32  # nearest document tokens fetched per query token
    tokens: str | None = None  # token set (content|image|text|all); None = the model's head's
    similarity: str | None = None  # maxsim | meanmaxsim; None = the model's head's

    def check(self, prefix: str) -> None:
        integers(self, prefix, max_tokens=0, candidate_tokens=1)
        choice(prefix + "pooling", self.pooling, ("cluster", "runs"))
        if self.tokens is not None:
            choice(prefix + "tokens", self.tokens, ("content", "image", "text", "all"))
        if self.similarity is not None:
            choice(prefix + "similarity", self.similarity, ("maxsim", "meanmaxsim"))


@dataclass
class ServeConfig(Validated):
    """Settings of ``fam serve`` (limits, dynamic batching, auth)."""

    host: str = "127.0.0.1"  # where to listen (default: this machine only)
    port: int = 8000
    max_batch: int = 32  # most inputs per forward (1 = one request at a time, no batching)
    max_wait_ms: float = 2.0  # how long a batch that is not full waits for more requests
    max_queue: int = 1024  # most requests waiting for the model; more are answered 503
    max_request_bytes: int = 32 * 1024 * 1024  # largest request body
    max_inputs: int = 256  # most inputs in one /v1/embeddings request
    max_text_chars: int = 4_000_000  # longest text of one input (= data.items.MAX_TEXT_CHARS)
    max_image_bytes: int = 10 * 1024 * 1024  # largest encoded image (after base64 decoding)
    max_image_pixels: int = 64_000_000  # largest width × height (= data.images.MAX_IMAGE_PIXELS)
    max_images_per_input: int = 8  # (= fam.data.items.MAX_IMAGES)
    max_video_frames: int = 256  # most frames of one input's video (8 are sampled and decoded)
    max_request_pixels: int = 256_000_000  # total width × height of a request's images + frames
    max_k: int = 100  # largest k of a search
    api_key: str | None = None  # bearer token required by the API when set
    allow_image_urls: bool = False  # fetch http(s):// image URLs (off: data URIs / base64)
    url_timeout_s: float = 10.0  # time limit of one image download
    served_model_name: str | None = None  # the model's name in the API (default: folder name)

    def check(self, prefix: str) -> None:
        integers(self, prefix, max_batch=1, max_queue=1, max_request_bytes=1, max_inputs=1,
                 max_text_chars=1, max_image_bytes=1, max_image_pixels=1,
                 max_images_per_input=1, max_video_frames=1, max_request_pixels=1, max_k=1,
                 port=0)
        if self.port > 65535:
            fail(prefix + "port", self.port, "must be in 0..65535")
        number(prefix + "max_wait_ms", self.max_wait_ms, 0.0)
        number(prefix + "url_timeout_s", self.url_timeout_s, 0.0, low_open=True)
        if self.api_key is not None and not self.api_key.strip():
            fail(prefix + "api_key", self.api_key, "is empty; unset it to disable auth")


@dataclass
class SearchWorkerConfig(Validated):
    """The query worker of ``fam search`` (fam.serve.search_worker): a background process
    that keeps an index and its model loaded between searches."""

    idle_s: float = 600.0  # the worker exits after this long without a request
    start_timeout_s: float = 600.0  # longest wait for a new worker to load (then: in-process)
    request_timeout_s: float = 600.0  # longest wait for one answer (then: in-process)

    def check(self, prefix: str) -> None:
        for key in ("idle_s", "start_timeout_s", "request_timeout_s"):
            number(prefix + key, getattr(self, key), 0.0, low_open=True)
