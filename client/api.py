"""Python client library for classifyd: a synchronous and an asyncio client.

Both raise ``grpc.RpcError`` (sync) / ``grpc.aio.AioRpcError`` (async) with the
server's status code and message when a call fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
_MAX_MESSAGE = ("grpc.max_send_message_length", 64 * 1024 * 1024)
_DTYPES = {np.dtype(np.uint8): pb.Tensor.UINT8, np.dtype(np.float32): pb.Tensor.FLOAT32}


def image_request(image: bytes | str | Path, *, model: str = "", version: int = 0, top_k: int = 0,
                  request_id: str = "", lang: str = "", return_tiles: bool = False) -> pb.ClassifyRequest:
    """A request for an encoded image (bytes, or the path of an image file).

    ``lang`` picks the model's ``labels.<lang>.txt``; ``return_tiles`` lists each tile of a tiling model."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return pb.ClassifyRequest(model=model, version=version, top_k=top_k, request_id=request_id, image=data,
                              lang=lang, return_tiles=return_tiles)


def tensor_request(array: np.ndarray, *, model: str = "", version: int = 0, top_k: int = 0,
                   request_id: str = "", lang: str = "", return_tiles: bool = False) -> pb.ClassifyRequest:
    """A request for a raw ``H x W`` or ``H x W x C`` uint8 or float32 (0..1) array."""
    dtype = _DTYPES.get(array.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype must be uint8 or float32, got {array.dtype}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    tensor = pb.Tensor(dtype=dtype, shape=list(array.shape), data=data)
    return pb.ClassifyRequest(model=model, version=version, top_k=top_k, request_id=request_id, tensor=tensor,
                              lang=lang, return_tiles=return_tiles)


class ClassifierClient:
    """Blocking client. Use as a context manager or call ``close()``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, channel: grpc.Channel | None = None) -> None:
        self._channel = channel or grpc.insecure_channel(target, options=[_MAX_MESSAGE])
        self.stub = pb_grpc.ClassifierStub(self._channel)

    def classify(self, image: bytes | str | Path, *, model: str = "", top_k: int = 0, version: int = 0,
                 timeout: float | None = None, lang: str = "") -> pb.ClassifyResponse:
        """Classify an encoded image or image file (labels in ``lang`` when the model has them)."""
        request = image_request(image, model=model, top_k=top_k, version=version, lang=lang)
        return self.stub.Classify(request, timeout=timeout)

    def classify_tensor(self, array: np.ndarray, *, model: str = "", top_k: int = 0, version: int = 0,
                        timeout: float | None = None) -> pb.ClassifyResponse:
        """Classify a raw pixel array."""
        return self.stub.Classify(tensor_request(array, model=model, top_k=top_k, version=version), timeout=timeout)

    def list_models(self, timeout: float | None = None) -> Sequence[pb.ModelInfo]:
        """Every model the daemon knows, with version states."""
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout).models

    def get_model(self, model: str = "", timeout: float | None = None) -> pb.ModelInfo:
        """One model ('' = the default model)."""
        return self.stub.GetModel(pb.GetModelRequest(model=model), timeout=timeout)

    def watch_models(self, model: str = "", *, include_current: bool = True) -> Iterator[pb.ModelEvent]:
        """Model events as they happen (blocks between events); cancel by closing the client."""
        request = pb.WatchModelsRequest(model=model, include_current=include_current)
        yield from self.stub.WatchModels(request)

    def reload_model(self, model: str = "", timeout: float | None = None) -> pb.ModelInfo:
        """Re-read a model from disk now and return its state afterwards."""
        return self.stub.ReloadModel(pb.ReloadModelRequest(model=model), timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClassifierClient:
    """asyncio client. Use ``async with`` or ``await close()``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, channel: grpc.aio.Channel | None = None) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target, options=[_MAX_MESSAGE])
        self.stub = pb_grpc.ClassifierStub(self._channel)

    async def classify(self, image: bytes | str | Path, *, model: str = "", top_k: int = 0, version: int = 0,
                       timeout: float | None = None) -> pb.ClassifyResponse:
        """Classify an encoded image or image file."""
        request = image_request(image, model=model, top_k=top_k, version=version)
        return await self.stub.Classify(request, timeout=timeout)

    async def classify_tensor(self, array: np.ndarray, *, model: str = "", top_k: int = 0, version: int = 0,
                              timeout: float | None = None) -> pb.ClassifyResponse:
        """Classify a raw pixel array."""
        request = tensor_request(array, model=model, top_k=top_k, version=version)
        return await self.stub.Classify(request, timeout=timeout)

    async def list_models(self, timeout: float | None = None) -> Sequence[pb.ModelInfo]:
        """Every model the daemon knows, with version states."""
        return (await self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout)).models

    async def get_model(self, model: str = "", timeout: float | None = None) -> pb.ModelInfo:
        """One model ('' = the default model)."""
        return await self.stub.GetModel(pb.GetModelRequest(model=model), timeout=timeout)

    async def watch_models(self, model: str = "", *, include_current: bool = True) -> AsyncIterator[pb.ModelEvent]:
        """Model events as they happen."""
        request = pb.WatchModelsRequest(model=model, include_current=include_current)
        async for event in self.stub.WatchModels(request):
            yield event

    async def reload_model(self, model: str = "", timeout: float | None = None) -> pb.ModelInfo:
        """Re-read a model from disk now and return its state afterwards."""
        return await self.stub.ReloadModel(pb.ReloadModelRequest(model=model), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
