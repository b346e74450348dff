"""What the fuzz tests of the HTTP and OIP edges share: a daemon with small limits, a log watcher, keep-alive HTTP,
and Hypothesis strategies for JSON, shapes, datatypes and versions.

The property every fuzz test checks: a client's mistake gets a 4xx (or a gRPC code naming the mistake) with a
message, never a 5xx, INTERNAL or UNKNOWN, and never a log line at ERROR (which is kept for the daemon's own
faults).
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from server.edges.common.oip_codec import join_bytes_elements
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import DaemonThread, running_daemon
from tests.support.repository import build_test_repository

MAX_BODY = 256 * 1024
MAX_JSON = 64 * 1024
MAX_IMAGES = 8
PNGS = [png_bytes(image) for image in held_out_digits()[0][:4]]
MODELS = ["digits", "digits", "digits", "wide", "nope"]
"""Models a request names: mostly the digits model, so most cases reach the tensors (never ``broken``, whose
UNAVAILABLE is a 503 on purpose)."""
FUZZ_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.large_base_example])
"""Derandomized, so CI runs the same cases; about 200 requests a test, a few seconds on 2 cores."""


@contextmanager
def fuzz_daemon(root: Path) -> Iterator[DaemonThread]:
    """A daemon with HTTP and small limits over the standard test repository built in ``root``."""
    build_test_repository(root)
    with running_daemon(root, http_port=0, watch=False, max_message_bytes=MAX_BODY, max_json_bytes=MAX_JSON,
                        max_images_per_request=MAX_IMAGES, max_pixels=1_000_000) as daemon:
        yield daemon


class ErrorLog(logging.Handler):
    """Collects every log record at ERROR or above, from any thread (the daemon's loop runs in its own)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        """The records since the last call, formatted (tracebacks included)."""
        taken, self.records = self.records, []
        return [f"{r.name}: {r.getMessage()}\n{logging.Formatter().formatException(r.exc_info) if r.exc_info else ''}"
                for r in taken]


@contextmanager
def watching_errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@dataclass
class Answer:
    status: int
    body: bytes


class KeepAlive:
    """One HTTP/1.1 connection, reopened when the server closes it (as it may after an error)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._connection: HTTPConnection | None = None

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        for attempt in range(2):
            if self._connection is None:
                self._connection = HTTPConnection("127.0.0.1", self._port, timeout=60)
            try:
                self._connection.request(method, path, body=body, headers=headers)
                response = self._connection.getresponse()
                answer = Answer(response.status, response.read())
            except (HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                self.close()
            return answer
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


HttpCase = tuple[str, bytes, dict[str, str]]
"""A POST request: path (with its query), body, headers."""


def post_checked(client: KeepAlive, errors: ErrorLog, case: HttpCase, name: str = "") -> Answer:
    """POST the case and check the property of every HTTP case: below 500, a JSON error with a code and a message
    when not 200, nothing logged at ERROR."""
    path, body, headers = case
    answer = client.send("POST", path, body, headers)
    what = f"{name} POST {path} {headers} {body[:300]!r}"
    assert answer.status < 500, f"{what} → {answer.status}: {answer.body[:500]!r}"
    if answer.status >= 400:
        body = json.loads(answer.body)  # /v1: {"error": {"code", "message"}}; /v2: {"error": message, "code"}
        error = body["error"] if isinstance(body["error"], dict) else {"message": body["error"], "code": body["code"]}
        assert error["code"] and error["message"], f"{what} → {answer.body[:300]!r}"
    logged = errors.take()
    assert not logged, f"{what} logged at ERROR:\n" + "\n".join(logged)
    return answer


# ----- strategies


def usually(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``common`` about four times in five, else ``rare``: most cases get past the first check to the next."""
    return st.integers(0, 4).flatmap(lambda n: common if n < 4 else rare)  # Hypothesis favours 0: common


def path_segment() -> st.SearchStrategy[str]:
    """A model name as a URL path segment: mostly sensible, sometimes anything."""
    return usually(st.sampled_from(MODELS), st.text(max_size=30)).map(lambda t: urllib.parse.quote(t, safe=""))


HARD_VERSIONS = ["01", "0", "-1", "+1", "²", "١", "1.0", "7", " 1", "1" * 19, "9" * 5000, "0" * 30 + "1", "\x00"]
"""Version strings that are not quite numbers: Unicode digits (``int()`` takes them), signs, thousands of digits."""
HARD_LENGTHS = ["²", "-1", "1" * 40, "9" * 5000, "0x10", "", " 5", "0", "³5"]
"""Inference-Header-Content-Length values that are not byte counts (or are far off)."""


def versions() -> st.SearchStrategy[str]:
    """Version strings: mostly none or right; else one of :data:`HARD_VERSIONS` or anything of digit-like text."""
    odd = st.one_of(st.sampled_from(HARD_VERSIONS), st.text(alphabet="0123456789²³¹٠١x-+ ", max_size=25))
    return usually(st.sampled_from(["", "", "1"]), odd)


def integers() -> st.SearchStrategy[int]:
    """Integers that matter: small, around 0, int64's edges, and far beyond (JSON allows any)."""
    return st.one_of(st.integers(-3, 300), st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
                                                            10**40]),
                     st.integers())


def shapes() -> st.SearchStrategy[list[int]]:
    return st.one_of(st.lists(st.integers(1, 8), min_size=1, max_size=4), st.lists(integers(), max_size=6))


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), integers(), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=20))
    return st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=max_leaves)


def b64_images() -> st.SearchStrategy[str]:
    """A base64 image: a real PNG, a broken one, or not base64 at all."""
    return st.one_of(st.sampled_from(PNGS).map(lambda b: base64.b64encode(b).decode()),
                     st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                     st.sampled_from(["", "%%", "data:image/png;base64,", "YQ", "====", "\u00e9"]))


RAW_JSON = [
    b"[" * 2000 + b"]" * 2000, b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", b'{"top_k": ' + b"9" * 5000 + b"}",
    b'{"top_k": ' + b"9" * 4000 + b"}", b'{"version": ' + b"9" * 4000 + b"}", b'{"timeout_ms": 1e999}',
    b'{"top_k": NaN}', b'{"x": Infinity}', b"\xff\xfe", b"", b"{", b"null", b"[]", b'"text"', b"1e999",
    b'{"inputs": [' + b"{}," * 2000 + b"{}]}", b'{"a": "' + b"[" * 100 + b'"}', b'{"a": 1, "a": [[[[]]]]}',
    b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ' + b"[" * 50 + b"]" * 50 + b"}]}",
    b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1], "data": [' + b"9" * 4000 + b"]}]}",
    b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [' + b"9" * 4000 + b'], "data": ["eA=="]}]}',
    b'{"id": ' + b"[" * 30 + b"]" * 30 + b', "inputs": []}', "{\"id\": \"\u2028\"}".encode(), rb'{"\ud800": 1}',
]
"""JSON documents Python's parser and the code after it find hard: deep, huge numbers, not JSON, not objects."""


def json_bodies(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """A document as JSON, sometimes cut short, sometimes replaced by one of :data:`RAW_JSON`."""
    encoded = documents.map(lambda d: _dumps(d))
    cut = st.tuples(encoded, st.integers(0, 200)).map(lambda pair: pair[0][:pair[1]])
    return usually(encoded, st.one_of(cut, st.sampled_from(RAW_JSON)))


def _dumps(document: Any) -> bytes:
    return json.dumps(document).encode()


def header_values() -> st.SearchStrategy[str]:
    """What an HTTP header may carry (no line breaks: the client refuses those)."""
    return st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                   max_size=40)


def raw_bytes_elements() -> st.SearchStrategy[bytes]:
    """Raw BYTES tensor data: well formed (PNGs, empty elements), truncated, or random."""
    good = st.lists(st.sampled_from([*PNGS, b"", b"junk"]), max_size=10).map(join_bytes_elements)
    return st.one_of(good, good.map(lambda b: b[:-3]), st.binary(max_size=64))
