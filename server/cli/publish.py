"""``python -m server publish models/<name> <weights>``: add the next version of a model in one atomic step.

The new version is written to a hidden staging directory beside its final place (``models/<name>/.publish-…``, or
``models/.publish-<name>-…`` for a model that does not exist yet: the watcher skips names that start with a dot),
loaded there exactly as ``python -m server check`` loads a version (build, weights, warm-up, validation samples,
preprocessing compared with the version serving before it), and only then renamed to ``models/<name>/<N>``: the
watcher never sees half a version, and a version that would fail to load never appears. Publishes of one model take
turns (a lock on the models directory), so concurrent publishes get consecutive numbers.

With ``--wait --target host:port`` it then follows the daemon's ``WatchModels`` events for the new version until it
is live (READY and serving, or PROMOTED by a rollout) or is not going to be (FAILED, REJECTED, UNLOADED), printing
each event with its figures. Exit status: 0 published (and live, with ``--wait``); 1 refused, failed, rejected or
timed out; 2 bad usage; 3 published, but the daemon loads the model only when asked (AVAILABLE).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from classifier.v1 import classifier_pb2 as pb

from client.__main__ import event_line
from client.api import DEFAULT_TARGET, ClassifierClient, read_token
from server.cli.check import add_load_flags, load_settings, verify
from server.core.manifest import LABELS_NAME, MANIFEST_NAME
from server.models.loader.pipeline import LoadSettings
from server.models.loader.validation import SAMPLES_DIR
from server.models.source.repository import version_numbers

STAGING_PREFIX = ".publish-"
"""Staging directories start with this: hidden from the watcher and the repository scan."""
DEFAULT_WAIT_S = 600.0
LIVE, FAILED, USAGE, NOT_LOADED = 0, 1, 2, 3
"""Exit statuses."""
_LIVE_KINDS = {"PROMOTED"}
_FAILED_KINDS = {"FAILED", "REJECTED", "UNLOADED"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server publish",
                                     description="Add the next version of a model atomically, once it loads.")
    parser.add_argument("model_dir", type=Path, help="the model's directory, e.g. models/digits (created if new)")
    parser.add_argument("weights", type=Path, help="the weights file (.safetensors, .pt, .onnx, …), copied as is")
    parser.add_argument("--labels", type=Path, help=f"a labels file for this version (its own {LABELS_NAME})")
    parser.add_argument("--manifest", type=Path,
                        help=f"a model.toml for this version, merged over the model's own {MANIFEST_NAME}")
    parser.add_argument("--samples", type=Path, help=f"validation samples (<label>/<image>) for its {SAMPLES_DIR}/")
    add_load_flags(parser)  # verified as `python -m server check` verifies, with its flags
    wait = parser.add_argument_group("waiting for the daemon (--wait)")
    wait.add_argument("--wait", action="store_true", help="follow the daemon's events until the version is live "
                                                          "or has failed")
    wait.add_argument("--target", default=DEFAULT_TARGET, help=f"the daemon, host:port (default: {DEFAULT_TARGET})")
    wait.add_argument("--wait-seconds", type=float, default=DEFAULT_WAIT_S,
                      help=f"give up after this long (default: {DEFAULT_WAIT_S:g})")
    wait.add_argument("--tls-ca", type=Path, help="PEM CA certificate that signed the daemon's: connect with TLS")
    wait.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    wait.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    wait.add_argument("--token-file", type=Path, help="send the bearer token in this file (first non-empty line)")
    args = parser.parse_args(argv)
    for name in ("weights", "labels", "manifest"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"{path} is not a file")
    if args.samples is not None and not args.samples.is_dir():
        parser.error(f"--samples {args.samples} is not a directory")
    if not args.model_dir.parent.is_dir():
        parser.error(f"{args.model_dir.parent} (the models directory) does not exist")
    if not args.model_dir.exists() and not (args.manifest and args.labels):
        parser.error(f"{args.model_dir} is a new model: give its --manifest and --labels")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="CRITICAL")  # the loader's own log lines; what matters is printed
    try:
        settings = load_settings(args)
    except (RuntimeError, ValueError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return USAGE
    try:
        with interrupted_by_sigterm():
            number = publish(args, settings)
    except OSError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print("FAILED: interrupted; nothing was published", file=sys.stderr)
        return FAILED
    if number is None:
        return FAILED
    print(f"PUBLISHED: {args.model_dir / str(number)}", flush=True)
    return wait_until_live(args, args.model_dir.name, number) if args.wait else LIVE


def publish(args: argparse.Namespace, settings: LoadSettings) -> int | None:
    """Stage, verify and rename the next version into place; its number, or None when verification refused it
    (the reason printed). Blocks (copies, loads the model); raises OSError for filesystem failures, leaving no
    staging directory behind."""
    model_dir = args.model_dir.absolute()
    with _turn(model_dir):
        remove_stale_staging(model_dir)
        new_model = not model_dir.exists()
        number = max(version_numbers(model_dir), default=0) + 1
        parent = model_dir.parent if new_model else model_dir
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{model_dir.name}-", dir=parent))
        try:
            staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the version from a daemon user
            staged_model = staging if new_model else model_dir
            version_dir = staging / str(number) if new_model else staging
            _stage(args, version_dir, new_model)
            print(f"model         {model_dir.name}, version {number} (staged in {staging})")
            refused = verify(settings, staged_model, number, version_dir, shown=args.model_dir)
            if refused:
                print(f"FAILED: {refused}\nnothing was published", file=sys.stderr)
                return None
            staging.rename(model_dir if new_model else model_dir / str(number))  # atomic: all or nothing
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _sync_dir(parent)
    return number


def _stage(args: argparse.Namespace, version_dir: Path, new_model: bool) -> None:
    """Copy the files into the staging directory, flushed to disk. A new model gets its manifest and labels at
    the model level (where later versions find them); an existing one gets them as the version's own."""
    version_dir.mkdir(parents=True, exist_ok=True)
    shared = version_dir.parent if new_model else version_dir
    _copy(args.weights, version_dir / args.weights.name)
    if args.labels:
        _copy(args.labels, shared / LABELS_NAME)
    if args.manifest:
        _copy(args.manifest, shared / MANIFEST_NAME)
    if args.samples:
        shutil.copytree(args.samples, version_dir / SAMPLES_DIR)
    _sync_dir(version_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with target.open("rb+") as handle:
        os.fsync(handle.fileno())  # on disk before the rename makes it visible


def _sync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


STALE_STAGING_S = 3600.0
"""A staging directory untouched this long is left over from a publish that was killed (SIGKILL, a crash)."""


def remove_stale_staging(model_dir: Path, *, now: float | None = None) -> list[Path]:
    """Remove the staging directories of ``model_dir`` (and a new model's beside it) not modified for
    :data:`STALE_STAGING_S`: leftovers of killed publishes, holding full weights. Call under :func:`_turn`, so that
    no publish is using one. Blocks; returns what it removed."""
    now = time.time() if now is None else now
    candidates = list(model_dir.parent.glob(f"{STAGING_PREFIX}{model_dir.name}-*"))
    if model_dir.is_dir():
        candidates += model_dir.glob(f"{STAGING_PREFIX}*")
    removed = []
    for path in candidates:
        with contextlib.suppress(OSError):
            if path.is_dir() and now - path.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(path)
                removed.append(path)
    return removed


@contextlib.contextmanager
def interrupted_by_sigterm() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, as Ctrl-C does, so that the staging directory is removed on
    the way out (a stopped pipeline job leaves no copy of the weights behind)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _turn(model_dir: Path) -> Iterator[None]:
    """Hold the repository's publish lock (``flock`` on the models directory itself, so no file is left behind):
    the next number is chosen and taken by one publish at a time, a new model's directory created by one. Blocks
    until the lock is free; the kernel releases it when the process ends in any way."""
    descriptor = os.open(model_dir.parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def wait_until_live(args: argparse.Namespace, name: str, number: int) -> int:
    """Follow ``name``'s events on the daemon until version ``number`` is live or will not be; the exit status.
    Blocks up to ``--wait-seconds``."""
    print(f"waiting for {args.target} to load version {number} of {name} (up to {args.wait_seconds:g} s)",
          flush=True)
    try:
        token = read_token(args.token_file) if args.token_file else None
        with ClassifierClient(args.target, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              token=token) as client:
            status, last = _follow(client, name, number, time.monotonic() + args.wait_seconds)
    except grpc.RpcError as exc:
        print(f"FAILED: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return FAILED
    except (OSError, ValueError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return FAILED
    if status is None:
        print(f"FAILED: version {number} was not live within {args.wait_seconds:g} s", file=sys.stderr)
        return FAILED
    if status == FAILED and last is not None:
        print(f"FAILED: version {number} is {kind_name(last.kind)}: {last.reason or 'no reason given'}",
              file=sys.stderr)
    return status


def _follow(client: ClassifierClient, name: str, number: int,
            deadline: float) -> tuple[int | None, pb.ModelEvent | None]:
    """Watch events (again while the daemon does not know the model yet) until one for ``number`` decides: its
    exit status and that event, or None once ``deadline`` passed. Raises grpc.RpcError for other failures."""
    while time.monotonic() < deadline:
        request = pb.WatchModelsRequest(model=name, include_current=True)
        events = client.stub.WatchModels(request, timeout=deadline - time.monotonic())
        try:
            for event in events:
                if event.version != number:
                    continue
                print(event_line(event), flush=True)
                status = outcome(event)
                if status is not None:
                    return status, event
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None, None
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: a new model not found yet; ask again
                raise
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
        finally:
            events.cancel()
    return None, None


def outcome(event: pb.ModelEvent) -> int | None:
    """The exit status an event of the published version decides, or None to keep waiting."""
    kind = kind_name(event.kind)
    if kind in _LIVE_KINDS or (kind == "READY" and event.serving):
        return LIVE
    if kind in _FAILED_KINDS:
        return FAILED
    if kind == "AVAILABLE":
        return NOT_LOADED
    return None  # LOADING, CANDIDATE, or READY beside a version that still serves


def kind_name(kind: int) -> str:
    """The event kind's name, whatever kinds this build's stubs know."""
    return pb.ModelEvent.Kind.Name(kind) if kind in pb.ModelEvent.Kind.values() else f"KIND_{kind}"
