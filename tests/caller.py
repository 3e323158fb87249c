"""Make one keyd request as another user (tests only).

    python -m tests.caller --uid 4001 --gid 65534 --socket PATH ACTION [ARG...]

Started as root, it imports everything it needs, then drops to the given uid and
gid (no supplementary groups unless --groups), and only then connects: keyd takes
the caller's identity from the kernel at connect time, so it sees the dropped one.
(Importing first matters: the checkout may sit under a directory the uid cannot
read.) Prints one JSON object: {"ok": true, "value": ...} or
{"ok": false, "kind": "PermissionDenied", "message": "..."}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import grpc
import grpc._channel  # grpc imports it only when a channel is made: before the uid drops

from keyd.client import CHANNEL_OPTIONS, Client, translate_error
from keyd.core.keytypes import KeyType
from keyd.errors import KeydError
from keyd.v1 import keyd_pb2 as pb
from keyd.v1 import keyd_pb2_grpc as pb_grpc


def _act(client: Client, socket: Path, action: str, args: list[str]) -> Any:  # noqa: PLR0911
    if action == "whoami":
        me = client.whoami()
        return {"uid": me.uid, "gid": me.gid, "pid": me.pid, "my_pid": os.getpid()}
    if action == "sign":
        return base64.b64encode(client.sign(args[0], args[1].encode()).signature).decode()
    if action == "create":
        role, collection = args
        return client.create_key(KeyType.ECDSA_P256, role=role, collection=collection).key_id
    if action == "list":
        return [k.key_id for k in client.list_keys()]
    if action == "delete":
        return client.delete_key(args[0]).state.value
    if action == "restore":
        return client.restore_key(args[0]).state.value
    if action == "purge":
        client.purge_key(args[0])
        return None
    if action == "status":
        return client.status().keys
    if action == "forge-sign":
        # Claims root in every way a client could think of; keyd must not listen.
        forged = (("uid", "0"), ("x-keyd-uid", "0"), ("user", "root"), ("x-forwarded-user", "0"))
        with grpc.insecure_channel(f"unix:{socket}", options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.SignServiceStub(channel)
            request = pb.SignRequest(key_id=args[0], message=args[1].encode())
            try:
                response = stub.Sign(request, metadata=forged, timeout=30)
            except grpc.RpcError as exc:
                raise translate_error(typing.cast(grpc.Call, exc), socket) from None
            return base64.b64encode(response.signature).decode()
    raise SystemExit(f"unknown action {action}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--groups", default="", help="comma-separated supplementary gids")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("action")
    parser.add_argument("args", nargs="*")
    options = parser.parse_args()
    os.setgroups([int(g) for g in options.groups.split(",") if g])
    os.setgid(options.gid)
    os.setuid(options.uid)
    try:
        with Client(options.socket, timeout=30) as client:
            value = _act(client, options.socket, options.action, options.args)
    except KeydError as exc:
        json.dump({"ok": False, "kind": type(exc).__name__, "message": exc.message}, sys.stdout)
        return
    json.dump({"ok": True, "value": value}, sys.stdout)


if __name__ == "__main__":
    main()
