"""A bare Python Notary signer: the ceiling for any shim written on grpcio.

Notary's Signer.Sign and KeyManagement.CreateKey over mutual TLS on the shim's
server model (grpcio threaded server, the shim's thread count), signing in this
process with `cryptography` and one in-memory P-256 key: no keyd, no second hop.
What it reaches next to Debian's notary-signer bounds what `keyd notary-signer`
can reach in Python on the same machine.

    python -m benchmarks.bare_notary_signer PORT CERT KEY CLIENT_CA
"""

from __future__ import annotations

import sys
from concurrent import futures
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.echo_server import serve_until_terminated
from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType
from keyd.core.signing import der_to_raw
from keyd.notary.shim import THREADS
from keyd.notary.wire import signer_pb2 as pb
from keyd.notary.wire import signer_pb2_grpc as pb_grpc

_KEY = ec.generate_private_key(ec.SECP256R1())
_ECDSA = ec.ECDSA(hashes.SHA256())
_PUBLIC = PublicKey.from_crypto(_KEY.public_key())
_INFO = pb.KeyInfo(
    keyID=pb.KeyID(ID=_PUBLIC.notary_key_id),
    algorithm=pb.Algorithm(algorithm=KeyType.ECDSA_P256.notary_keytype),
)


class _Keys(pb_grpc.KeyManagementServicer):
    def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.ServicerContext
    ) -> pb.PublicKey:
        return pb.PublicKey(keyInfo=_INFO, publicKey=_PUBLIC.notary_bytes)

    def GetKeyInfo(self, request: pb.KeyID, context: grpc.ServicerContext) -> pb.GetKeyInfoResponse:
        return pb.GetKeyInfoResponse(keyInfo=_INFO, publicKey=_PUBLIC.notary_bytes, role="")

    def DeleteKey(self, request: pb.KeyID, context: grpc.ServicerContext) -> pb.Void:
        return pb.Void()


class _Signer(pb_grpc.SignerServicer):
    def Sign(self, request: pb.SignatureRequest, context: grpc.ServicerContext) -> pb.Signature:
        signature = der_to_raw(_KEY.sign(request.content, _ECDSA), KeyType.ECDSA_P256)
        return pb.Signature(
            keyInfo=_INFO,
            algorithm=pb.Algorithm(algorithm=KeyType.ECDSA_P256.notary_method),
            content=signature,
        )


def main() -> None:
    port, cert, key, client_ca = sys.argv[1:5]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=THREADS))
    pb_grpc.add_KeyManagementServicer_to_server(_Keys(), server)
    pb_grpc.add_SignerServicer_to_server(_Signer(), server)
    credentials = grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    serve_until_terminated(server)


if __name__ == "__main__":
    main()
