"""``python -m client``: classify images, list and watch models, and benchmark a daemon from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from classifier.v1 import classifier_pb2 as pb

from client import bench as benchmark
from client.api import DEFAULT_TARGET, ClassifierClient, read_token


def _connection_flags(parser: argparse.ArgumentParser, default: object = None) -> None:
    """TLS and token flags; sub-commands repeat them (default SUPPRESS) so they may follow the command too."""
    parser.add_argument("--tls-ca", type=Path, default=default,
                        help="PEM CA certificate that signed the server's certificate: connect with TLS")
    parser.add_argument("--tls-cert", type=Path, default=default, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, default=default, help="PEM key of --tls-cert")
    parser.add_argument("--token-file", type=Path, default=default,
                        help="send the bearer token in this file (first non-empty line)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description="Talk to a classifyd daemon.")
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"host:port (default: {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call deadline in seconds")
    _connection_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify image files")
    classify.add_argument("images", nargs="+", type=Path)
    classify.add_argument("--model", default="", help="model name (default: the daemon's default model)")
    classify.add_argument("--top-k", type=int, default=0, help="predictions per image (default: the model's)")
    classify.add_argument("--version", type=int, default=0, help="pin a version (default: newest ready)")
    classify.add_argument("--lang", default="", help="labels language, e.g. zh (default: labels.txt)")
    classify.add_argument("--target", default=argparse.SUPPRESS, help="host:port")
    models = commands.add_parser("models", help="list models and their versions")
    models.add_argument("--target", default=argparse.SUPPRESS, help="host:port")
    watch = commands.add_parser("watch", help="print model events (loads, swaps, failures) until interrupted")
    watch.add_argument("--model", default="", help="only this model")
    watch.add_argument("--no-current", dest="current", action="store_false", help="skip the current state")
    watch.add_argument("--target", default=argparse.SUPPRESS, help="host:port")
    reload = commands.add_parser("reload", help="re-read a model from disk now")
    reload.add_argument("model", nargs="?", default="", help="model name (default: the default model)")
    reload.add_argument("--target", default=argparse.SUPPRESS, help="host:port")
    load = commands.add_parser("load", help="load a model of the catalogue (--model-control explicit)")
    unload = commands.add_parser("unload", help="unload a model once its requests in flight are answered")
    for control in (load, unload):
        control.add_argument("model", help="model name")
        control.add_argument("--target", default=argparse.SUPPRESS, help="host:port")
    rollout = _rollout_commands(commands)
    bench = commands.add_parser("bench", help="measure throughput and latency under load (see docs/benchmarks.md)")
    benchmark.add_arguments(bench)
    for command in (classify, models, watch, reload, load, unload, *rollout):
        _connection_flags(command, argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


def classify(client: ClassifierClient, args: argparse.Namespace) -> None:
    for path in args.images:
        response = client.classify(path, model=args.model, top_k=args.top_k, version=args.version,
                                   timeout=args.timeout, lang=args.lang)
        hit = ", cache hit" if response.cache_hit else ""
        print(f"{path}: {response.model} v{response.version} (batch {response.batch_size}, "
              f"{labels_used(response.lang, args.lang)}{hit})")
        for p in response.predictions:
            print(f"  {p.score:7.4f}  {p.index:>5}  {p.label}")


def labels_used(answered: str, asked: str) -> str:
    """Which labels file answered, and when it is not the language asked for, that it fell back."""
    if answered:
        return f"labels.{answered}.txt"
    return f"labels.txt: no labels.{asked}.txt" if asked else "labels.txt"


def list_models(client: ClassifierClient, args: argparse.Namespace) -> None:
    for info in client.list_models(timeout=args.timeout):
        mark = " (default)" if info.is_default else ""
        print(f"{info.name}{mark}: {info.architecture}, {info.num_labels} labels, input "
              f"{info.input.height}x{info.input.width}x{info.input.channels} {info.input.color}, "
              f"device {info.device}, max batch {info.max_batch_size}")
        extras = [f"precision {info.precision}" + (f" ({info.precision_note})" if info.precision_note else "")] \
            if info.precision else []
        if info.languages:
            extras.append(f"labels in {', '.join(info.languages)} (--lang)")
        if info.loaded_bytes:
            extras.append(f"loaded_bytes {info.loaded_bytes}")
        if extras:
            print(f"  {'; '.join(extras)}")
        for v in info.versions:
            error = f": {v.error}" if v.error else ""
            serving = " (serving)" if v.version == info.serving_version else ""
            print(f"  version {v.version}: {state_name(v.state)}{serving}{error}")


def state_name(state: int) -> str:
    """``READY`` for 2: states by name, whatever the stub version."""
    return pb.VersionInfo.State.Name(state) if state in pb.VersionInfo.State.values() else f"state {state}"


def watch(client: ClassifierClient, args: argparse.Namespace) -> None:
    for event in client.watch_models(args.model, include_current=args.current):
        print(event_line(event), flush=True)


def event_line(event: pb.ModelEvent) -> str:
    """``12:00:01 digits v2 READY (serving): version 2 now serves``: the reason says which version serves."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time_unix_ms / 1000))
    serving = " (serving)" if event.serving else ""
    reason = f": {event.reason}" if event.reason else ""
    return f"{stamp} {event.model} v{event.version} {pb.ModelEvent.Kind.Name(event.kind)}{serving}{reason}"


def _rollout_commands(commands: Any) -> list[argparse.ArgumentParser]:
    """promote, reject and rollback: an operator's rollout decisions (docs/rollout.md)."""
    promote = commands.add_parser("promote", help="promote a model's rollout candidate now")
    reject = commands.add_parser("reject", help="reject a model's rollout candidate (or roll back its serving version)")
    for decide in (promote, reject):
        decide.add_argument("model", help="model name")
        decide.add_argument("version", type=int, help="the version")
    rollback = commands.add_parser("rollback", help="reject the serving version: the previous version serves")
    rollback.add_argument("model", nargs="?", default="", help="model name (default: the default model)")
    for command in (reject, rollback):
        command.add_argument("--reason", default="", help="why, recorded with the decision")
    for command in (promote, reject, rollback):
        command.add_argument("--target", default=argparse.SUPPRESS, help="host:port")
    return [promote, reject, rollback]


def promote(client: ClassifierClient, args: argparse.Namespace) -> None:
    print_state(client.promote_version(args.model, args.version, timeout=args.timeout))


def reject(client: ClassifierClient, args: argparse.Namespace) -> None:
    print_state(client.reject_version(args.model, args.version, args.reason, timeout=args.timeout))


def rollback(client: ClassifierClient, args: argparse.Namespace) -> None:
    print_state(client.rollback_model(args.model, args.reason, timeout=args.timeout))


def reload(client: ClassifierClient, args: argparse.Namespace) -> None:
    print_state(client.reload_model(args.model, timeout=args.timeout))


def load(client: ClassifierClient, args: argparse.Namespace) -> None:
    print_state(client.load_model(args.model, timeout=args.timeout))


def unload(client: ClassifierClient, args: argparse.Namespace) -> None:
    print_state(client.unload_model(args.model, timeout=args.timeout))


def print_state(info: pb.ModelInfo) -> None:
    """The model's serving version and each version's state, as reload, load and unload print them."""
    print(f"{info.name}: serving version {info.serving_version or 'none'}")
    for v in info.versions:
        error = f": {v.error}" if v.error else ""
        print(f"  version {v.version}: {state_name(v.state)} (generation {v.generation}){error}")
    if info.HasField("rollout"):
        r = info.rollout
        print(f"  rollout: version {r.candidate_version} {r.mode} candidate ({r.decision}): {r.compared}/"
              f"{r.min_requests} compared, agreement {r.agreement:.3f} (min {r.min_agreement:g}), errors {r.errors}")


COMMANDS: dict[str, Callable[[ClassifierClient, argparse.Namespace], None]] = {
    "classify": classify,
    "models": list_models,
    "watch": watch,
    "reload": reload,
    "load": load,
    "unload": unload,
    "promote": promote,
    "reject": reject,
    "rollback": rollback,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "bench":
        try:
            return benchmark.main(args)
        except KeyboardInterrupt:
            return 130
    try:
        token = read_token(args.token_file) if args.token_file else None
        with ClassifierClient(args.target, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              token=token) as client:
            COMMANDS[args.command](client, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
