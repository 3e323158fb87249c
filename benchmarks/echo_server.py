"""A trivial gRPC echo server: the transport ceiling keyd's Sign is compared with.

Same grpcio server model and options as keyd (threaded server, same pool size,
Unix socket); the handler returns the request bytes unchanged.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures

import grpc

from keyd.config import ServerConfig

METHOD = "/bench.Echo/Echo"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def main() -> None:
    path = sys.argv[1]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else ServerConfig().worker_threads
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        maximum_concurrent_rpcs=ServerConfig().max_concurrent_rpcs,
    )
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    server.add_insecure_port(f"unix:{path}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop(0).wait()


if __name__ == "__main__":
    main()
