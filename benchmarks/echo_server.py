"""Reference gRPC servers: the ceilings keyd's Sign is compared with.

Same grpcio server model and options as keyd (threaded server, same pool size,
Unix socket). Two services:
  /bench.Echo/Echo        returns the request bytes unchanged (the transport ceiling)
  /bench.Bare/Sign        keyd.v1 Sign with no keyd code: parse, sign with
  /bench.Bare/SignBatch   `cryptography`, answer; what any Python signer on this
                          server model can reach (no identity, policy, audit or
                          key lookup)
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keyd.config import ServerConfig
from keyd.v1 import keyd_pb2 as pb

METHOD = "/bench.Echo/Echo"
BARE_SIGN = "/bench.Bare/Sign"
BARE_BATCH = "/bench.Bare/SignBatch"

_KEY = ec.generate_private_key(ec.SECP256R1())
_ECDSA = ec.ECDSA(hashes.SHA256())


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _sign(request: pb.SignRequest, context: grpc.ServicerContext) -> pb.SignResponse:
    return pb.SignResponse(key_id=request.key_id, signature=_KEY.sign(request.message, _ECDSA))


def _sign_batch(
    request: pb.SignBatchRequest, context: grpc.ServicerContext
) -> pb.SignBatchResponse:
    response = pb.SignBatchResponse()
    for item in request.requests:
        signed = response.results.add().signature
        signed.key_id = item.key_id
        signed.signature = _KEY.sign(item.message, _ECDSA)
    return response


def main() -> None:
    path = sys.argv[1]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else ServerConfig().worker_threads
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        maximum_concurrent_rpcs=ServerConfig().max_concurrent_rpcs,
    )
    echo = grpc.unary_unary_rpc_method_handler(_echo)
    sign = grpc.unary_unary_rpc_method_handler(
        _sign, pb.SignRequest.FromString, pb.SignResponse.SerializeToString
    )
    batch = grpc.unary_unary_rpc_method_handler(
        _sign_batch, pb.SignBatchRequest.FromString, pb.SignBatchResponse.SerializeToString
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("bench.Echo", {"Echo": echo}),
            grpc.method_handlers_generic_handler("bench.Bare", {"Sign": sign, "SignBatch": batch}),
        )
    )
    server.add_insecure_port(f"unix:{path}")
    serve_until_terminated(server)


def serve_until_terminated(server: grpc.Server) -> None:
    """Start, say "ready" on stdout (see benchmarks.core.ready_process), stop on SIGTERM."""
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop(0).wait()


if __name__ == "__main__":
    main()
