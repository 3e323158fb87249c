"""The notary socket: callers on it reach only online keys of collections.

This is keyd's half of "the Notary shim may only reach timestamp and snapshot keys":
the daemon enforces it, whatever the caller on that socket asks for.
"""

from __future__ import annotations

import stat

import pytest

from keyd.client import Client, SignItem
from keyd.core.keytypes import KeyType
from keyd.errors import NotFound, PermissionDenied
from tests.harness import Daemon

MESSAGE = b"timestamp.json signed part"


def test_notary_socket_reaches_only_online_keys_of_collections(daemon: Daemon) -> None:
    d = daemon
    notary_path = d.notary_socket
    assert stat.S_IMODE(notary_path.stat().st_mode) == 0o660
    gun = "registry.example.com/app"
    with d.client() as admin, Client(notary_path) as shim:
        root = admin.create_key(KeyType.ECDSA_P256, role="root", collection=gun)
        targets = admin.create_key(KeyType.ECDSA_P256, role="targets", collection=gun)
        loose = admin.create_key(KeyType.ECDSA_P256, role="timestamp")  # no collection
        timestamp = admin.create_key(KeyType.ECDSA_P256, role="timestamp", collection=gun)
        snapshot = shim.create_key(KeyType.ED25519, role="snapshot", collection=gun)

        assert {k.key_id for k in shim.list_keys()} == {timestamp.key_id, snapshot.key_id}
        shim.sign(timestamp.key_id, MESSAGE)
        shim.sign(snapshot.key_id, MESSAGE)
        for hidden in (root, targets, loose):
            with pytest.raises(NotFound, match="no key with ID"):
                shim.get_key(hidden.key_id)
            with pytest.raises(NotFound):
                shim.sign(hidden.key_id, MESSAGE)
            with pytest.raises(NotFound):
                shim.delete_key(hidden.key_id)
            admin.get_key(hidden.key_id)  # still there
        items = [SignItem(root.key_id, MESSAGE), SignItem(timestamp.key_id, MESSAGE)]
        results = list(shim.sign_batch(items))
        assert isinstance(results[0], NotFound)
        assert not isinstance(results[1], Exception)

        with pytest.raises(PermissionDenied, match="snapshot or timestamp keys"):
            shim.create_key(KeyType.ECDSA_P256, role="root", collection=gun)
        with pytest.raises(PermissionDenied, match="needs a collection"):
            shim.create_key(KeyType.ECDSA_P256, role="timestamp")
        with pytest.raises(PermissionDenied, match="may not adopt"):
            shim.adopt_key(backend="store", device_key_id="01")

        # Status on the notary socket shows only what the socket can reach.
        status = shim.status()
        assert [b.name for b in status.backends] == ["store"]
        assert status.keys == 2
        assert status.backends[0].keys == 2  # not the 5 store keys the daemon has
        with pytest.raises(PermissionDenied, match="may only create"):
            shim.create_key(KeyType.ECDSA_P256, role="timestamp", collection=gun, backend="nope")

        # Deleted keys are gone for the shim (its DeleteKey is idempotent) and pending
        # deletion on the main socket, where an operator can restore them.
        shim.delete_key(snapshot.key_id)
        with pytest.raises(NotFound):
            shim.get_key(snapshot.key_id)
        with pytest.raises(NotFound):
            shim.delete_key(snapshot.key_id)
        assert admin.get_key(snapshot.key_id).state.value == "pending_deletion"
        admin.restore_key(snapshot.key_id)
        shim.sign(snapshot.key_id, MESSAGE)
        # The main socket is unrestricted.
        assert len(admin.list_keys()) == 5
