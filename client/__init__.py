"""classifyd client library: ``ClassifierClient`` (blocking) and ``AsyncClassifierClient`` (asyncio)."""

from client.api import AsyncClassifierClient, ClassifierClient, image_request, tensor_request

__all__ = ["AsyncClassifierClient", "ClassifierClient", "image_request", "tensor_request"]
