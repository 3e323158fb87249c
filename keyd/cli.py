"""The `keyd` command: serve, init, keys, sign, status.

Errors are one line on stderr (`keyd: error: ...`) and a non-zero exit code,
never a traceback. Secrets are never taken from argv: only from files, systemd
credentials or a prompt.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import getpass
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from keyd import __version__, errors
from keyd.config import DEFAULT_CONFIG, NOTARY_SIGNER_CONFIG, Config, SecretKind
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord
from keyd.errors import InvalidArgument, KeydError, SecretError

if TYPE_CHECKING:
    from keyd.client import Client
    from keyd.store.secret import StoreSecret

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_DENIED = 5

_EXIT_CODES: tuple[tuple[type[KeydError], int], ...] = (
    (errors.NotFound, EXIT_NOT_FOUND),
    (errors.Unavailable, EXIT_UNAVAILABLE),
    (errors.PermissionDenied, EXIT_DENIED),
    (errors.InvalidArgument, EXIT_USAGE),
)


def _exit_code(exc: KeydError) -> int:
    return next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), EXIT_ERROR)


# -- output -------------------------------------------------------------------


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="seconds")


def key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "key_id": record.key_id,
        "tuf_key_id": record.public_key.tuf_key_id,
        "key_type": record.key_type.value,
        "tuf_keytype": record.key_type.tuf_keytype,
        "tuf_scheme": record.key_type.tuf_scheme,
        "backend": record.backend,
        "location": dict(record.location),
        "role": record.role,
        "collection": record.collection,
        "labels": dict(record.labels),
        "created": _iso(record.created_unix_ms),
        "state": record.state.value,
        "public_key": base64.b64encode(record.public_key.notary_bytes).decode("ascii"),
        "public_key_pem": record.public_key.pem,
    }


def _print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _show_key(record: KeyRecord, device: Mapping[str, str]) -> None:
    data = key_json(record)
    data["device"] = dict(device)
    width = max(len(k) for k in data)
    for name in (
        "key_id",
        "tuf_key_id",
        "key_type",
        "backend",
        "location",
        "role",
        "collection",
        "labels",
        "created",
        "state",
        "device",
    ):
        value = data[name]
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
        print(f"{name.replace('_', ' '):<{width}}  {value or '-'}")
    print(record.public_key.pem, end="")


# -- commands -------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    from keyd.client import Client  # grpc is only imported by commands that need it

    return Client(args.socket, timeout=args.timeout)


def _labels(pairs: Sequence[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep:
            raise InvalidArgument(f"label {pair!r} must be NAME=VALUE")
        labels[name] = value
    return labels


def cmd_serve(args: argparse.Namespace) -> int:
    from keyd.daemon.server import serve

    return serve(Config.load(args.config))


def cmd_notary_signer(args: argparse.Namespace) -> int:
    from keyd.notary.config import ShimConfig
    from keyd.notary.shim import serve

    return serve(ShimConfig.load(args.config))


def _load_config_for_init(args: argparse.Namespace) -> Config:
    if args.config is not None:
        return Config.load(args.config)
    if DEFAULT_CONFIG.exists() and args.store is None:
        return Config.load(DEFAULT_CONFIG)
    return Config()


def cmd_init(args: argparse.Namespace) -> int:
    from keyd.store.database import Database
    from keyd.store.secret import StoreSecret, create_secret_file, ensure_private_dir

    config = _load_config_for_init(args)
    store_path = (args.store or config.store.path).absolute()
    secret_file = args.secret_file or config.store.secret_file
    kind = SecretKind.PASSPHRASE if args.passphrase else config.store.secret_kind
    ensure_private_dir(store_path.parent)
    if kind is SecretKind.RAW_KEY:
        if secret_file is None:
            raise SecretError("say where to write the store secret: --secret-file PATH")
        secret = StoreSecret.generate()
        create_secret_file(secret_file.absolute(), secret)
    elif secret_file is not None and secret_file.exists():
        from keyd.store.secret import load_store_secret

        secret = load_store_secret(kind, secret_file)
    else:
        secret = _prompt_new_passphrase()
    try:
        Database.create(store_path, secret).close()
    except KeydError:
        if kind is SecretKind.RAW_KEY and secret_file is not None:
            secret_file.unlink()  # nothing was stored with it; do not leave it behind
        raise
    policy = _starter_policy(config, args.admin)
    result = {
        "store": str(store_path),
        "secret_file": str(secret_file) if secret_file else None,
        "secret_kind": kind.value,
        "policy": str(policy[0]) if policy else None,
    }
    if args.json:
        _print_json(result)
    else:
        print(f"created store {store_path}")
        if kind is SecretKind.RAW_KEY:
            print(f"store secret written to {secret_file} (mode 0600); keep it safe")
        if policy:
            print(f"policy written to {policy[0]}: user {policy[1]!r} may do everything; edit it")
    return 0


def _starter_policy(config: Config, admin: str | None) -> tuple[Path, str] | None:
    """Write a policy granting one administrator everything, unless one exists: without
    a policy the daemon denies every request (default deny)."""
    from keyd.config import AccessMode

    path = config.access.policy
    if config.access.mode is not AccessMode.POLICY or path.exists():
        return None
    import pwd

    user = admin or os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    text = (
        "# keyd's policy: who may do what with which keys (docs/access.md).\n"
        "# Nothing is allowed unless a rule allows it; root is not special.\n"
        "# Apply changes with `systemctl reload keyd` (SIGHUP).\n\n"
        "[[allow]]\n"
        f'name = "administrator chosen at keyd init"\n'
        f"users = [{json.dumps(user)}]\n"
        'operations = ["create", "sign", "list", "delete", "admin"]\n'
    )
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as exc:
        raise KeydError(f"cannot write the policy {path}: {exc.strerror}") from None
    return path, user


def _prompt_new_passphrase() -> StoreSecret:
    from keyd.store.secret import StoreSecret

    if not sys.stdin.isatty():
        raise SecretError(
            "a passphrase store needs a terminal to type the passphrase, or a secret file "
            "holding it (--secret-file)"
        )
    first = getpass.getpass("new store passphrase: ").encode("utf-8")
    if getpass.getpass("repeat the passphrase: ").encode("utf-8") != first:
        raise SecretError("the passphrases differ; nothing was created")
    return StoreSecret.parse(SecretKind.PASSPHRASE, first, "the passphrase prompt")


def cmd_keys_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = client.create_key(
            KeyType.parse(args.type),
            role=args.role,
            collection=args.collection,
            labels=_labels(args.label),
            backend=args.backend,
            slot=args.slot,
            on_touch=_ask_for_touch,
        )
    if args.json:
        _print_json(key_json(record))
    else:
        print(record.key_id)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        records = client.list_keys(
            role=args.role,
            collection=args.collection,
            backend=args.backend,
            labels=_labels(args.label),
        )
    if args.json:
        _print_json([key_json(r) for r in records])
        return 0
    if not records:
        print("no keys", file=sys.stderr)
        return 0
    print(f"{'KEY ID':<64}  {'TYPE':<10}  {'BACKEND':<12}  {'ROLE':<10}  COLLECTION")
    for r in records:
        print(
            f"{r.key_id}  {r.key_type.value:<10}  {r.backend:<12}  {r.role or '-':<10}  "
            f"{r.collection or '-'}"
        )
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        details = client.key_details(args.key_id)
    record = details.record
    if args.json:
        _print_json({**key_json(record), "device": dict(details.device)})
    elif args.pem:
        print(record.public_key.pem, end="")
    else:
        _show_key(record, details.device)
    return 0


def cmd_keys_adopt(args: argparse.Namespace) -> int:
    if not (args.id or args.device_label):
        raise InvalidArgument(
            "name the key on the device with --id (CKA_ID hex, or a YubiKey slot) or --device-label"
        )
    with _client(args) as client:
        record = client.adopt_key(
            backend=args.backend,
            device_key_id=args.id or "",
            device_label=args.device_label or "",
            role=args.role,
            collection=args.collection,
            labels=_labels(args.label),
            on_touch=_ask_for_touch,
        )
    if args.json:
        _print_json(key_json(record))
    else:
        print(record.key_id)
    return 0


def cmd_keys_delete(args: argparse.Namespace) -> int:
    if args.destroy_on_device and args.confirm != args.key_id:
        raise InvalidArgument(
            "destroying a key on its device cannot be undone: repeat its key ID with "
            "--confirm KEY_ID"
        )
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidArgument("confirm the deletion with --yes")
        answer = input(f"delete key {args.key_id}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted", file=sys.stderr)
            return EXIT_ERROR
    with _client(args) as client:
        record = client.delete_key(
            args.key_id, destroy_on_device_confirmed=args.confirm if args.destroy_on_device else ""
        )
    if args.json:
        _print_json(key_json(record))
    else:
        fate = "destroyed" if record.destroy_on_purge or record.backend == "store" else "forgotten"
        print(
            f"key {args.key_id} is pending deletion: it cannot sign; it will be {fate} after "
            f"{_iso(record.purge_after_unix_ms)} (`keyd keys restore {args.key_id}` undoes this)"
        )
    return 0


def cmd_keys_restore(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = client.restore_key(args.key_id)
    if args.json:
        _print_json(key_json(record))
    else:
        print(f"restored {args.key_id}")
    return 0


def cmd_keys_purge(args: argparse.Namespace) -> int:
    if args.confirm != args.key_id:
        raise InvalidArgument("purging cannot be undone: repeat the key ID with --confirm KEY_ID")
    with _client(args) as client:
        client.purge_key(args.key_id)
    if args.json:
        _print_json({"purged": args.key_id})
    else:
        print(f"purged {args.key_id}")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    with _client(args) as client:
        me = client.whoami()
    if args.json:
        _print_json(
            {
                "uid": me.uid,
                "gid": me.gid,
                "pid": me.pid,
                "groups": sorted(me.groups),
                "user": me.user,
                "executable": me.exe,
                "socket": me.socket,
            }
        )
    else:
        groups = ",".join(str(g) for g in sorted(me.groups))
        print(f"{me.describe()}, gid {me.gid}, groups {groups}, via the {me.socket} socket")
    return 0


def cmd_audit_reset(args: argparse.Namespace) -> int:
    """Let keyd start a new audit log after the old one was lost (daemon stopped)."""
    from keyd.store.audit_state import AuditState
    from keyd.store.database import Database
    from keyd.store.secret import load_store_secret

    if not args.yes:
        raise InvalidArgument(
            "keyd refuses to start without the audit log it last wrote; this makes it forget "
            "that log's last checkpoint and start a new chain. Restore the log from a backup "
            "if you can; otherwise confirm with --yes"
        )
    config = Config.load(args.config)
    secret = load_store_secret(config.store.secret_kind, config.store.secret_file)
    db = Database.open(config.store.path, secret)  # refused while the daemon runs (lock)
    try:
        forgotten = AuditState(db).forget_head()
    finally:
        db.close()
    if forgotten is None:
        print("keyd had recorded no audit checkpoint; nothing to forget")
    else:
        seq, head = forgotten
        print(
            f"forgot audit checkpoint seq {seq} (hash {head}); keyd continues whatever log is "
            f"in {config.audit_directory}, or starts a new one"
        )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from keyd.audit import format_report, verify_log

    public_key = None
    if args.key:
        try:
            public_key = base64.b64decode(args.key, validate=True)
        except ValueError:
            raise InvalidArgument("--key must be the base64 audit public key") from None
    report = verify_log(args.paths if len(args.paths) > 1 else args.paths[0], public_key)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(format_report(report))
    return 0 if report.ok else EXIT_ERROR


def _read_input(name: str | None, limit: int) -> bytes:
    stream: BinaryIO
    if name in (None, "-"):
        stream = sys.stdin.buffer
        data = stream.read(limit + 1)
    else:
        try:
            with open(name, "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise InvalidArgument(f"cannot read {name}: {exc.strerror}") from None
    if len(data) > limit:
        raise InvalidArgument(f"input is larger than {limit} bytes; sign a digest instead")
    return data


def _ask_for_touch(device: str) -> None:
    print(f"touch the {device}", file=sys.stderr, flush=True)


def cmd_sign(args: argparse.Namespace) -> int:
    digest = None
    message = None
    if args.digest is not None:
        try:
            digest = bytes.fromhex(args.digest)
        except ValueError:
            raise InvalidArgument("--digest must be hexadecimal") from None
    else:
        message = _read_input(args.input, 64 * 1024 * 1024)
    with _client(args) as client:
        sig = client.sign(
            args.key_id,
            message,
            digest=digest,
            encoding=SignatureEncoding(args.encoding),
            on_touch=_ask_for_touch,
        )
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(sig.signature)
    if args.json:
        _print_json(
            {
                "key_id": sig.key_id,
                "key_type": sig.key_type.value,
                "encoding": sig.encoding.value,
                "signature": base64.b64encode(sig.signature).decode("ascii"),
            }
        )
    elif not args.output:
        print(base64.b64encode(sig.signature).decode("ascii"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    healthy = all(b.healthy for b in status.backends)
    if args.json:
        _print_json(
            {
                "version": status.version,
                "started": _iso(status.started_unix_ms),
                "socket": status.socket,
                "keys": status.keys,
                "healthy": healthy,
                "access_mode": status.access_mode,
                "audit_public_key": status.audit_public_key,
                "backends": [
                    {
                        "name": b.name,
                        "healthy": b.healthy,
                        "state": b.state,
                        "detail": b.detail,
                        "keys": b.keys,
                    }
                    for b in status.backends
                ],
            }
        )
    else:
        print(f"keyd {status.version} on {status.socket}, up since {_iso(status.started_unix_ms)}")
        print(f"{status.keys} keys")
        if status.access_mode == "policy":
            print(f"callers checked by the policy; audit key {status.audit_public_key}")
        elif status.access_mode:
            print("access mode OPEN: callers are not identified, authorised or audited")
        for b in status.backends:
            state = "ok" if b.healthy else f"UNHEALTHY ({b.state})"
            print(
                f"  backend {b.name}: {state}, {b.keys} keys{f' ({b.detail})' if b.detail else ''}"
            )
    return 0 if healthy else EXIT_UNAVAILABLE


# -- parser -----------------------------------------------------------------------


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="daemon socket (default: $KEYD_SOCKET or /run/keyd/keyd.sock)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", default="", help="root, targets, snapshot, timestamp, ...")
    parser.add_argument("--collection", default="", help="Notary GUN the key belongs to")
    parser.add_argument("--label", action="append", metavar="NAME=VALUE")


def _add_keys_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="create, adopt, list, show and delete keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    p = keys_sub.add_parser("create", help="create a key")
    p.add_argument("--type", required=True, choices=[t.value for t in KeyType])
    _add_filters(p)
    p.add_argument("--backend", default="store", help="where the key lives (default store)")
    p.add_argument(
        "--slot", default="", help="YubiKey: the PIV slot, 9c or 82-95 (default: as configured)"
    )
    _add_client_options(p)
    p.set_defaults(func=cmd_keys_create)

    p = keys_sub.add_parser("list", help="list keys, optionally filtered")
    _add_filters(p)
    p.add_argument("--backend", default="")
    _add_client_options(p)
    p.set_defaults(func=cmd_keys_list)

    p = keys_sub.add_parser("show", help="show one key")
    p.add_argument("key_id")
    p.add_argument("--pem", action="store_true", help="print only the public key (PEM)")
    _add_client_options(p)
    p.set_defaults(func=cmd_keys_show)

    p = keys_sub.add_parser(
        "adopt", help="record a key that already exists on a device (made elsewhere)"
    )
    p.add_argument("--backend", required=True, help="e.g. pkcs11:NAME or yubikey:NAME")
    p.add_argument("--id", help="PKCS#11: the key's CKA_ID in hex; YubiKey: its PIV slot (9c)")
    p.add_argument("--device-label", help="PKCS#11: the key's CKA_LABEL")
    _add_filters(p)
    _add_client_options(p)
    p.set_defaults(func=cmd_keys_adopt)

    p = keys_sub.add_parser(
        "delete",
        help="delete a key: it stops signing now and is purged after the deletion window "
        "(store keys are then destroyed; device keys forgotten unless --destroy-on-device)",
    )
    p.add_argument("key_id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--destroy-on-device",
        action="store_true",
        help="also destroy a hardware key on its device at purge (admin; needs --confirm)",
    )
    p.add_argument("--confirm", default="", metavar="KEY_ID", help="the key ID again")
    _add_client_options(p)
    p.set_defaults(func=cmd_keys_delete)

    p = keys_sub.add_parser("restore", help="bring back a key pending deletion")
    p.add_argument("key_id")
    _add_client_options(p)
    p.set_defaults(func=cmd_keys_restore)

    p = keys_sub.add_parser("purge", help="remove a key pending deletion now (admin)")
    p.add_argument("key_id")
    p.add_argument("--confirm", default="", metavar="KEY_ID", help="the key ID again")
    _add_client_options(p)
    p.set_defaults(func=cmd_keys_purge)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"keyd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML configuration")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "notary-signer", help="serve Notary's signer API (mutual TLS) in front of keyd"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=NOTARY_SIGNER_CONFIG,
        help="TOML configuration (see docs/notary.md)",
    )
    p.set_defaults(func=cmd_notary_signer)

    p = sub.add_parser("init", help="create the encrypted store and its secret")
    p.add_argument("--config", type=Path, default=None, help="take paths from this config")
    p.add_argument("--store", type=Path, default=None, help="store file to create")
    p.add_argument("--secret-file", type=Path, default=None, help="secret file to create")
    p.add_argument(
        "--passphrase",
        action="store_true",
        help="derive the store key from a passphrase (prompted, or read from "
        "an existing --secret-file)",
    )
    p.add_argument(
        "--admin",
        default=None,
        metavar="USER",
        help="when no policy exists yet, write one that lets USER do everything "
        "(default: the user running init, or $SUDO_USER)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_init)

    _add_keys_commands(sub)

    p = sub.add_parser("sign", help="sign a file, stdin or a digest")
    p.add_argument("key_id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", help="file to sign (default: stdin)")
    src.add_argument("--digest", help="hex digest to sign (ECDSA and RSA keys)")
    p.add_argument(
        "--encoding",
        choices=[e.value for e in SignatureEncoding],
        default="native",
        help="ECDSA signature form: der (default) or raw r||s (Notary)",
    )
    p.add_argument("--output", help="write the binary signature here instead of base64 on stdout")
    _add_client_options(p)
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("status", help="daemon and backend health")
    _add_client_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("whoami", help="how keyd identifies you (uid, gid, pid)")
    _add_client_options(p)
    p.set_defaults(func=cmd_whoami)

    audit = sub.add_parser("audit", help="check the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    p = audit_sub.add_parser(
        "verify", help="check the hash chain and signed checkpoints; name the first bad record"
    )
    p.add_argument("paths", nargs="+", type=Path, help="the audit directory, or its files")
    p.add_argument(
        "--key", default="", help="the audit public key (base64) to pin; `keyd status` shows it"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_audit_verify)
    p = audit_sub.add_parser(
        "reset",
        help="after losing the audit log: let keyd start a new one (daemon stopped; "
        "needs the store secret)",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="keyd's configuration")
    p.add_argument("--yes", action="store_true", help="confirm")
    p.set_defaults(func=cmd_audit_reset)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeydError as exc:
        print(f"keyd: error: {exc.message}", file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        print("keyd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
