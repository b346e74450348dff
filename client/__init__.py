"""classifyd client library: ``ClassifierClient`` (blocking) and ``AsyncClassifierClient`` (asyncio)."""

from client.api import (
    AsyncClassifierClient,
    ClassifierClient,
    image_request,
    open_aio_channel,
    open_channel,
    read_token,
    tensor_request,
)

__all__ = ["AsyncClassifierClient", "ClassifierClient", "image_request", "open_aio_channel", "open_channel",
           "read_token", "tensor_request"]
