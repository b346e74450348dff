"""Python client library for classifyd: a synchronous and an asyncio client.

Both raise ``grpc.RpcError`` (sync) / ``grpc.aio.AioRpcError`` (async) with the
server's status code and message when a call fails.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

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


def channel_credentials(tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                        tls_key: str | Path | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files, or None for plaintext when none is given.

    ``tls_ca`` verifies the server (default: the system's roots); ``tls_cert`` and ``tls_key`` are the client's
    own certificate for mutual TLS. Blocks on file reads; raises ValueError or OSError.
    """
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key: give both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )


def read_token(path: str | Path) -> str:
    """The bearer token in a file: its first non-empty line. Raises OSError or ValueError."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            return line.strip()
    raise ValueError(f"token file {path} is empty")


_CallDetails = namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression")


class _SyncCallDetails(_CallDetails, grpc.ClientCallDetails):
    pass


def _with_token(metadata: Any, token: str) -> list[tuple[str, str | bytes]]:
    return [*(tuple(m) for m in (metadata or ())), ("authorization", f"Bearer {token}")]


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncCallDetails(details.method, details.timeout, _with_token(details.metadata, self._token),
                                details.credentials, details.wait_for_ready, getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AioBearerToken:
    """Adds ``authorization: Bearer <token>`` to every call of an asyncio channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def _call(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(details._replace(metadata=_with_token(details.metadata, self._token)), request)


class _AioUnaryUnary(_AioBearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _AioUnaryStream(_AioBearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _AioStreamUnary(_AioBearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._call(continuation, details, requests)


class _AioStreamStream(_AioBearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._call(continuation, details, requests)


def open_channel(target: str = DEFAULT_TARGET, *, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, token: str | None = None) -> grpc.Channel:
    """A blocking channel: plaintext, or TLS when any TLS file is given; with a bearer token when given."""
    credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    channel = (grpc.secure_channel(target, credentials, options=[_MAX_MESSAGE]) if credentials
               else grpc.insecure_channel(target, options=[_MAX_MESSAGE]))
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


def open_aio_channel(target: str = DEFAULT_TARGET, *, tls_ca: str | Path | None = None,
                     tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                     token: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel, configured like :func:`open_channel`."""
    credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    interceptors = ([_AioUnaryUnary(token), _AioUnaryStream(token), _AioStreamUnary(token), _AioStreamStream(token)]
                    if token else None)
    if credentials:
        return grpc.aio.secure_channel(target, credentials, options=[_MAX_MESSAGE], interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=[_MAX_MESSAGE], interceptors=interceptors)


class ClassifierClient:
    """Blocking client. Use as a context manager or call ``close()``.

    TLS: pass ``tls_ca`` (and ``tls_cert`` / ``tls_key`` for mutual TLS); auth: pass ``token``.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, channel: grpc.Channel | None = None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, token: str | None = None) -> None:
        self._channel = channel or open_channel(target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                                token=token)
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

    def promote_version(self, model: str, version: int, timeout: float | None = None) -> pb.ModelInfo:
        """Promote the model's rollout candidate ``version`` now (an operator's call); its state afterwards."""
        return self.stub.PromoteVersion(pb.PromoteVersionRequest(model=model, version=version), timeout=timeout)

    def reject_version(self, model: str, version: int, reason: str = "",
                       timeout: float | None = None) -> pb.ModelInfo:
        """Reject the model's candidate (or roll back its serving version) ``version`` (an operator's call)."""
        return self.stub.RejectVersion(pb.RejectVersionRequest(model=model, version=version, reason=reason),
                                       timeout=timeout)

    def rollback_model(self, model: str = "", reason: str = "", timeout: float | None = None) -> pb.ModelInfo:
        """Reject the serving version so that the previous one serves (an operator's call)."""
        return self.stub.RollbackModel(pb.RollbackModelRequest(model=model, reason=reason), timeout=timeout)

    def load_model(self, model: str, timeout: float | None = None) -> pb.ModelInfo:
        """Load a model of the catalogue (--model-control explicit); its state once loaded."""
        return self.stub.LoadModel(pb.LoadModelRequest(model=model), timeout=timeout)

    def unload_model(self, model: str, timeout: float | None = None) -> pb.ModelInfo:
        """Unload a model once its requests in flight are answered; its state afterwards."""
        return self.stub.UnloadModel(pb.UnloadModelRequest(model=model), timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClassifierClient:
    """asyncio client. Use ``async with`` or ``await close()``. TLS and token options as :class:`ClassifierClient`."""

    def __init__(self, target: str = DEFAULT_TARGET, *, channel: grpc.aio.Channel | None = None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, token: str | None = None) -> None:
        self._channel = channel or open_aio_channel(target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                                    token=token)
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

    async def load_model(self, model: str, timeout: float | None = None) -> pb.ModelInfo:
        """Load a model of the catalogue (--model-control explicit); its state once loaded."""
        return await self.stub.LoadModel(pb.LoadModelRequest(model=model), timeout=timeout)

    async def unload_model(self, model: str, timeout: float | None = None) -> pb.ModelInfo:
        """Unload a model once its requests in flight are answered; its state afterwards."""
        return await self.stub.UnloadModel(pb.UnloadModelRequest(model=model), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
