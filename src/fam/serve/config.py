"""Settings of ``fam serve`` (limits, batching, auth), validated at construction."""
from __future__ import annotations

from dataclasses import dataclass

from fam.errors import ConfigError


@dataclass
class ServeConfig:
    """Server settings.

    Attributes:
        host, port: where to listen (default loopback only).
        max_batch: most inputs the model worker embeds in one forward (1 = one request at
            a time, no batching).
        max_wait_ms: how long the worker waits for more requests to join a batch that is not
            full yet.
        max_queue: most requests waiting for the model; more are answered 503 (back-pressure).
        max_request_bytes: largest request body.
        max_inputs: most inputs in one ``/v1/embeddings`` request.
        max_text_chars: longest text of one input.
        max_image_bytes: largest encoded image (after base64 decoding).
        max_image_pixels: largest decoded image (width × height): decompression-bomb guard.
        max_images_per_input: most images in one input.
        max_k: largest ``k`` of a search.
        api_key: bearer token required by the API when set.
        allow_image_urls: fetch ``http(s)://`` image URLs (off: only data URIs / base64).
        url_timeout_s: time limit of one image download.
        served_model_name: the model's name in the API (default: the model folder's name).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    max_request_bytes: int = 32 * 1024 * 1024
    max_inputs: int = 256
    max_text_chars: int = 20_000
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_images_per_input: int = 8
    max_k: int = 100
    api_key: str | None = None
    allow_image_urls: bool = False
    url_timeout_s: float = 10.0
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for name in ("max_batch", "max_queue", "max_request_bytes", "max_inputs",
                     "max_text_chars", "max_image_bytes", "max_image_pixels",
                     "max_images_per_input", "max_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if self.max_wait_ms < 0:
            raise ConfigError(f"ServeConfig.max_wait_ms={self.max_wait_ms!r}: must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"ServeConfig.port={self.port!r}: must be in 0..65535")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("ServeConfig.api_key: empty; unset it to disable auth")
