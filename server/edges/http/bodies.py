"""Reading HTTP request bodies within their limits: whole bodies, JSON documents and multipart forms.

Every limit is checked while reading, before what is over it is kept: a body past its limit is refused with 413 and
a message naming the limit (before anything is read when its ``Content-Length`` already says so); a JSON document
has a limit of its own (``--max-json-bytes``), smaller than the body limit, because parsing costs far more per byte
than storing an image, and a large one is parsed in a worker thread so the event loop keeps answering; a multipart
form counts its parts and everything around their data (headers, boundaries) against the body limit, and a part
whose name the form does not accept is refused before its data is read. Malformed JSON or multipart is
:class:`~server.core.errors.InvalidInput` with a message, never an unexpected exception.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from server.core import errors
from server.edges.common.requests import off_loop_if

JSON_INLINE_BYTES = 64 * 1024
"""JSON documents up to this size are parsed on the event loop (microseconds); larger ones in a worker thread."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a JSON document may have (an OIP tensor's data needs 6). Deeper documents
are refused right after parsing, so nothing later recurses through them (repr, flattening, the answer's JSON)."""
MAX_JSON_CONTAINERS = 1 << 20
"""Most arrays and objects a JSON document may have, counted as its ``[`` and ``{`` bytes before parsing. Every
container is an object the garbage collector tracks: a 16 MiB document of ``[[0]]`` took seconds to parse, with the
GIL held throughout. Tensor data sent flat (as Triton's clients send it) has a handful."""
_MALFORMED_MULTIPART = (ValueError, LookupError, AssertionError, RuntimeError, HttpProcessingError)
"""What aiohttp's multipart reader raises for a body that is not the multipart it claims to be (it checks some of
the form with ``assert``)."""


class BodyTooLarge(web.HTTPRequestEntityTooLarge):
    """413 raised while reading a body, its text naming the limit that was exceeded."""

    def __init__(self, what: str, limit: int, size: int | None = None) -> None:
        size_text = f" of {size} bytes" if size is not None else ""
        super().__init__(max_size=limit, actual_size=size or 0,
                         text=f"{what}{size_text} exceeds the limit of {limit} bytes")


async def read_body(request: web.Request, limit: int, what: str = "request body") -> bytes:
    """The whole body, at most ``limit`` bytes. Raises :class:`BodyTooLarge` past it, before reading anything when
    the declared ``Content-Length`` is already over (a chunked body is measured as it arrives)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(what, limit, request.content_length)
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(what, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, limit: int) -> Any:
    """The body as a JSON document of at most ``limit`` bytes (:func:`parse_json`). Raises BodyTooLarge or
    InvalidInput."""
    return await parse_json(await read_body(request, limit, "JSON body"))


async def parse_json(data: bytes) -> Any:
    """The JSON document ``data``, parsed in a worker thread past :data:`JSON_INLINE_BYTES`. Raises InvalidInput
    for anything that is not JSON, is nested deeper than :data:`MAX_JSON_DEPTH` or holds more than
    :data:`MAX_JSON_CONTAINERS` arrays and objects, has an integer of more digits than Python converts (4300), or
    uses NaN or Infinity (not JSON)."""
    return await off_loop_if(len(data) > JSON_INLINE_BYTES, load_json, data)


def load_json(data: bytes) -> Any:
    """:func:`parse_json` on the calling thread. Raises InvalidInput."""
    containers = data.count(b"[") + data.count(b"{")  # an upper bound: brackets inside strings count too
    if containers > MAX_JSON_CONTAINERS:
        raise errors.InvalidInput(f"JSON body has more than {MAX_JSON_CONTAINERS} arrays and objects; send tensor "
                                  "data as one flat array (row-major) or as binary data")
    try:
        document = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise errors.InvalidInput(f"JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and int()'s digit limit
        raise errors.InvalidInput(f"body is not valid JSON: {str(exc)[:200]}") from None
    if containers > MAX_JSON_DEPTH and _depth_exceeds(document, MAX_JSON_DEPTH):  # deeper needs more containers
        raise errors.InvalidInput(f"JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    return document


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth_exceeds(document: Any, limit: int) -> bool:
    """Whether arrays and objects nest deeper than ``limit``; iterative, so any depth can be measured."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


async def read_form(request: web.Request, limit: int, accepted: Collection[str]) -> list[tuple[str, bytes]]:
    """The parts of a multipart/form-data body as (name, data), in order.

    At most ``len(accepted) + 1`` parts, each named in ``accepted``; a part with another name is refused before
    its data is read. Everything read (part data, headers, boundaries) counts against ``limit``. Raises
    InvalidInput for a malformed body or a part it does not accept, BodyTooLarge past ``limit``.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge("request body", limit, request.content_length)
    try:
        reader = await request.multipart()
        parts: list[tuple[str, bytes]] = []
        while (part := await reader.next()) is not None:
            parts.append((_accepted_name(part, accepted, len(parts)), await _read_part(part, request, limit)))
    except _MALFORMED_MULTIPART as exc:
        raise errors.InvalidInput(f"malformed multipart/form-data body: {str(exc)[:200] or type(exc).__name__}") \
            from None
    return parts


def _accepted_name(part: BodyPartReader | MultipartReader, accepted: Collection[str], before: int) -> str:
    if before > len(accepted):
        raise errors.InvalidInput(f"the form has more than {len(accepted) + 1} parts; it accepts "
                                  f"{', '.join(accepted)}")
    if not isinstance(part, BodyPartReader):
        raise errors.InvalidInput("nested multipart bodies are not supported")
    name = part.name
    if name not in accepted:
        shown = "no name" if name is None else repr(name[:100])
        raise errors.InvalidInput(f"unknown form field ({shown}); accepted: {', '.join(accepted)}")
    return name


async def _read_part(part: BodyPartReader, request: web.Request, limit: int) -> bytes:
    """One part's data. The multipart reader does not enforce client_max_size, so the bytes received so far
    (data, headers and boundaries alike) are checked against ``limit`` as they arrive."""
    chunks = []
    while True:
        if request.content.total_bytes > limit:
            raise BodyTooLarge("request body", limit)
        chunk = await part.read_chunk()
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
