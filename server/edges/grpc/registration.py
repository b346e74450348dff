"""How the daemon's services are put on its grpc.aio server: through their generic handlers only.

The generated ``add_*Servicer_to_server`` functions register each service twice: as a generic handler and as
grpc's "registered methods". grpc.aio's accept loop keeps one pending request-call future per registered method
and, for every call it accepts, waits on all of them at once with ``asyncio.wait`` and re-arms the one that fired
(``_server_main_loop`` in grpc/_cython/_cygrpc/aio/server.pyx.pxi). With the daemon's methods that is a done
callback added and removed on the event loop for each of them, for every request, whatever method it calls;
served through the generic handlers, every method shares one future (reflection's one registered method keeps
its own: ``enable_server_reflection`` picks its asyncio servicer by the server's type). Measured with
``benchmarks/loop_work.py`` (docs/benchmarks.md, "the event loop's work per request"): grpc's accept loop took
33-37 µs of the loop per request with the registered methods and 24-27 µs without.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class GenericOnly:
    """The server as the generated registration functions see it: their generic handler is added, their
    registered methods are not (the generic handler serves the same methods). Pass it where those functions take
    a server; everything else keeps using the server itself."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Ignored: the same methods are in the generic handler the function adds too."""
