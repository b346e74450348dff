"""Hostile-client benchmark: every attack of issue 14 against a live daemon while a good client keeps classifying.

``python -m benchmarks.abuse [--seconds-per-attack 3] [--only NAME ...]``

It starts ``python -m server`` (gRPC and HTTP on free ports) over a temporary repository holding the default digits
model and a small tiling model, then runs each attack in turn. During each attack a second client sends good
``Classify`` requests in a loop. Per attack it prints: what the attacker got (status, and how long until it was
answered), the good client's p99 latency during the attack, the daemon's peak RSS growth over its RSS before the
attack, and whether the daemon still answers afterwards. The targets (issue 14): every attack refused within 1 s,
good-client p99 under 1 s throughout, RSS growth under 300 MB per attack (for large legitimate decodes: within the
decode budget), the daemon alive at the end.

Every address is on loopback, every loop is bounded in count and time, and the script stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc
from PIL import Image

from benchmarks.support import copy_digits

ATTACK_TIMEOUT_S = 30.0
GOOD_TIMEOUT_S = 10.0
RSS_SAMPLE_S = 0.05


@dataclass
class Outcome:
    """What one attack achieved, and what the good client and the daemon saw meanwhile."""

    name: str
    status: str = ""
    seconds: float = 0.0
    good_latencies: list[float] = field(default_factory=list)
    good_failures: int = 0
    rss_growth: int = 0
    alive: bool = True

    def p99_ms(self) -> float:
        return float(np.percentile(self.good_latencies, 99)) * 1000 if self.good_latencies else float("nan")

    def row(self) -> str:
        return (f"| {self.name} | {self.status} | {self.seconds * 1000:.0f} | {self.p99_ms():.0f} | "
                f"{len(self.good_latencies)} ok, {self.good_failures} failed | {self.rss_growth / 2**20:.0f} | "
                f"{'yes' if self.alive else 'NO'} |")


@dataclass
class Target:
    """Where the daemon listens."""

    grpc: str
    http_port: int


# ----- attacks: each returns a short description of the status the attacker got


def _http(target: Target, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", target.http_port, timeout=ATTACK_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        text = response.read()[:200].decode("utf-8", "replace")
        return f"HTTP {response.status} {text!r}"[:140]
    finally:
        connection.close()


def _oip_json(target: Target, document: object, path: str = "/v2/models/digits/infer") -> str:
    return _http(target, "POST", path, json.dumps(document).encode(), {"Content-Type": "application/json"})


def _grpc(call: Callable[[grpc.Channel], object], target: Target) -> str:
    with grpc.insecure_channel(target.grpc, options=[("grpc.max_send_message_length", 256 * 2**20)]) as channel:
        try:
            call(channel)
        except grpc.RpcError as exc:
            return f"gRPC {exc.code().name}: {(exc.details() or '')[:100]}"
        return "gRPC OK"


def _infer(channel: grpc.Channel, request: oip.ModelInferRequest) -> None:
    oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=ATTACK_TIMEOUT_S)


def _grpc_tensor(shape: list[int], datatype: str = "UINT8", **contents: object) -> oip.ModelInferRequest:
    tensor = oip.ModelInferRequest.InferInputTensor(name="image", datatype=datatype, shape=shape)
    for key, value in contents.items():
        getattr(tensor.contents, key).extend(value)  # type: ignore[arg-type]
    return oip.ModelInferRequest(model_name="digits", inputs=[tensor])


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    chunks = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + data + b"\r\n"
              for name, data in parts]
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


def _png16(side: int) -> bytes:
    return _png(np.zeros((side, side), dtype=np.uint16))


def _png8(side: int) -> bytes:
    return _png(np.zeros((side, side), dtype=np.uint8))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _many_huge_pngs(target: Target) -> str:
    png = _png16(10_000)
    results: list[str] = []

    def one() -> None:
        results.append(_http(target, "POST", "/v1/classify", png, {"Content-Type": "image/png"})[:60])

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return "; ".join(results)


def _stream_without_reading(target: Target) -> str:
    """ClassifyStream: write many requests, never read an answer, then hang up."""
    request = pb.ClassifyRequest(model="digits", tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[8, 8],
                                                                 data=bytes(64)))
    with grpc.insecure_channel(target.grpc) as channel:
        call = pb_grpc.ClassifierStub(channel).ClassifyStream(iter([request] * 20_000), timeout=5)
        time.sleep(3)
        call.cancel()
    return "stream cancelled by the attacker after 3 s unread"


def _reload_spam(target: Target) -> str:
    codes: list[str] = []

    def one() -> None:
        codes.append(_grpc(lambda c: pb_grpc.ClassifierStub(c).ReloadModel(pb.ReloadModelRequest(model="digits"),
                                                                            timeout=ATTACK_TIMEOUT_S), target))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ", ".join(sorted({c.split(":")[0] for c in codes}))


ATTACKS: dict[str, Callable[[Target], str]] = {
    "REST shape [1e12,0,1,1]": lambda t: _oip_json(t, {"inputs": [
        {"name": "image", "datatype": "UINT8", "shape": [10**12, 0, 1, 1], "data": []}]}),
    "REST shape wraps int64": lambda t: _oip_json(t, {"inputs": [
        {"name": "image", "datatype": "UINT8", "shape": [2**63 - 1, 2**63 - 1, 1, 1], "data": [0]}]}),
    "REST shape element >= 2^63": lambda t: _oip_json(t, {"inputs": [
        {"name": "image", "datatype": "UINT8", "shape": [2**64, 1], "data": [0]}]}),
    "gRPC shape wraps int64": lambda t: _grpc(lambda c: _infer(c, _grpc_tensor(
        [2**63 - 1, 2**63 - 1, 1, 1], uint_contents=[0])), t),
    "gRPC 1M empty BYTES": lambda t: _grpc(lambda c: _infer(c, _grpc_tensor(
        [1_000_000], "BYTES", bytes_contents=[b""] * 1_000_000)), t),
    "REST UINT8 [1M,1,1,1]": lambda t: _oip_json(t, {"inputs": [
        {"name": "image", "datatype": "UINT8", "shape": [1_000_000, 1, 1, 1], "data": [0] * 1_000_000}]}),
    "REST outputs x200k": lambda t: _oip_json(t, {
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, 8], "data": [0] * 64}],
        "outputs": [{"name": "probabilities"}] * 200_000}),
    "REST parameters not an object": lambda t: _oip_json(t, {
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, 8], "data": [0] * 64}], "parameters": [1]}),
    "REST version '²'": lambda t: _oip_json(t, {}, "/v2/models/digits/versions/%C2%B2/infer"),
    "REST Inference-Header-Content-Length '²'": lambda t: _http(
        t, "POST", "/v2/models/digits/infer", b"{}",
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "²"}),
    "JSON nested 1000 deep": lambda t: _http(t, "POST", "/v1/classify", b"[" * 1000 + b"]" * 1000,
                                             {"Content-Type": "application/json"}),
    "JSON 5000-digit integer": lambda t: _http(t, "POST", "/v1/classify", b'{"top_k": ' + b"9" * 5000 + b"}",
                                               {"Content-Type": "application/json"}),
    "multipart 100k parts": lambda t: _http(t, "POST", "/v1/classify", _multipart([("x", b"")] * 100_000),
                                            {"Content-Type": "multipart/form-data; boundary=b0undary"}),
    "multipart unknown fields 8x4MiB": lambda t: _http(
        t, "POST", "/v1/classify", _multipart([(f"junk{i}", b"\0" * 4 * 2**20) for i in range(8)]),
        {"Content-Type": "multipart/form-data; boundary=b0undary"}),
    "multipart without boundary": lambda t: _http(t, "POST", "/v1/classify", b"--x\r\n\r\n",
                                                  {"Content-Type": "multipart/form-data"}),
    "gRPC model_version 5000 digits": lambda t: _grpc(lambda c: _infer(c, oip.ModelInferRequest(
        model_name="digits", model_version="9" * 5000)), t),
    "ReloadModel 300-char name": lambda t: _grpc(lambda c: pb_grpc.ClassifierStub(c).ReloadModel(
        pb.ReloadModelRequest(model="m" * 300), timeout=ATTACK_TIMEOUT_S), t),
    "tiling: 9000x9000 PNG = 1.3M tiles": lambda t: _http(t, "POST", "/v1/models/tiles/classify", _png8(9_000),
                                                          {"Content-Type": "image/png"}),
    "3 concurrent 10000x10000 16-bit PNGs": _many_huge_pngs,
    "ClassifyStream written, never read": _stream_without_reading,
    "ReloadModel x20 concurrent": _reload_spam,
}


# ----- the good client and the measurements


def _good_client(target: Target, stop: threading.Event, outcome: Outcome) -> None:
    request = pb.ClassifyRequest(model="digits", image=_digit_png())
    with grpc.insecure_channel(target.grpc) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                stub.Classify(request, timeout=GOOD_TIMEOUT_S)
                outcome.good_latencies.append(time.perf_counter() - started)
            except grpc.RpcError:
                outcome.good_failures += 1
            time.sleep(0.02)


def _digit_png() -> bytes:
    """A held-out handwritten digit as a PNG (what the README's digit.png is)."""
    from tests.support.digits_data import held_out_digits, png_bytes  # tests/ helpers, as below

    return png_bytes(held_out_digits()[0][-1])


def _rss(pid: int) -> int:
    fields = Path(f"/proc/{pid}/status").read_text(encoding="ascii").split("\n")
    return next(int(line.split()[1]) * 1024 for line in fields if line.startswith("VmRSS:"))


def run_attack(name: str, attack: Callable[[Target], str], target: Target, pid: int, settle_s: float) -> Outcome:
    """One attack with the good client running and RSS sampled; blocks until both are done."""
    outcome = Outcome(name)
    stop = threading.Event()
    good = threading.Thread(target=_good_client, args=(target, stop, outcome), daemon=True)
    before, peak = _rss(pid), 0
    good.start()
    started = time.perf_counter()
    result: list[str] = []
    attacker = threading.Thread(target=lambda: result.append(_safe(attack, target)), daemon=True)
    attacker.start()
    while attacker.is_alive() and time.perf_counter() - started < ATTACK_TIMEOUT_S * 2:
        peak = max(peak, _rss(pid))
        attacker.join(RSS_SAMPLE_S)
    outcome.seconds = time.perf_counter() - started
    outcome.status = result[0] if result else "attacker still waiting (no answer)"
    settle_until = time.perf_counter() + settle_s
    while time.perf_counter() < settle_until:
        peak = max(peak, _rss(pid))
        time.sleep(RSS_SAMPLE_S)
    stop.set()
    good.join(GOOD_TIMEOUT_S + 1)
    outcome.rss_growth = max(0, peak - before)
    outcome.alive = _alive(target)
    return outcome


def _safe(attack: Callable[[Target], str], target: Target) -> str:
    try:
        return attack(target)
    except (OSError, http.client.HTTPException, grpc.RpcError, ValueError) as exc:  # the attacker's own errors
        return f"client error: {type(exc).__name__}: {exc}"[:140]


def _alive(target: Target) -> bool:
    try:
        with grpc.insecure_channel(target.grpc) as channel:
            pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
        return True
    except grpc.RpcError:
        return False


def _repository(root: Path) -> Path:
    """The digits model and a tiling model (random-init small CNN) that tiles 8x8 grayscale inputs."""
    from tests.support.kit import write_model  # tests/ helpers: the benchmark runs from the repository root

    copy_digits(root)
    write_model(root, "tiles", manifest={"input": {"color": "L", "size": 8, "resize": 8},
                                         "tiling": {"tile": 8, "max_tiles": 64}, "batching": {"max_queue": 256}})
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-attack", type=float, default=2.0,
                        help="how long the good client keeps running after each attack was answered (default: 2)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these attacks (names as printed)")
    args = parser.parse_args(argv)
    from tests.support.daemon_process import SERVER, DaemonProcess

    with tempfile.TemporaryDirectory(prefix="classifyd-abuse-") as tmp:
        models = _repository(Path(tmp) / "models")
        flags = ("--http-port", "0", "--no-watch", "--log-level", "INFO", "--max-batch-size", "8")
        with DaemonProcess(models, Path(tmp), *flags, entry=SERVER) as daemon:
            target = Target(daemon.target, _http_port(Path(tmp) / "daemon.log"))
            print("| attack | attacker got | answered in ms | good p99 ms | good client | RSS growth MiB | alive |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            outcomes = []
            for name, attack in ATTACKS.items():
                if args.only and name not in args.only:
                    continue
                outcome = run_attack(name, attack, target, daemon.pid, args.seconds_per_attack)
                outcomes.append(outcome)
                print(outcome.row(), flush=True)
    failed = [o.name for o in outcomes if not o.alive]
    print(f"\n{len(outcomes)} attacks; daemon alive at the end: {not failed}")
    return 1 if failed else 0


def _http_port(log: Path) -> int:
    """The HTTP port the daemon logged in its 'serving on' line."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"HTTP on http://[^\s]+:(\d+)/", log.read_text(encoding="utf-8", errors="replace"))
        if match:
            return int(match.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"the daemon logged no HTTP port:\n{log.read_text(encoding='utf-8', errors='replace')}")

if __name__ == "__main__":
    sys.exit(main())
