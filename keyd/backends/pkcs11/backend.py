"""Backend `pkcs11:NAME`: keys generated on, or adopted from, a PKCS#11 token.

Private keys never leave the token (CKA_SENSITIVE, not CKA_EXTRACTABLE); the
catalog records where each lives (module, token label and serial, CKA_ID) and
every signature is verified by the daemon before it is returned.
"""

from __future__ import annotations

import logging
import secrets
import typing
from collections.abc import Mapping, Sequence

import pkcs11
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11_errors

from keyd.backends.base import Backend, BackendHealth, DeviceKeyRef, GeneratedKey
from keyd.backends.pkcs11.keys import (
    PRIVATE_TEMPLATE,
    generation_arguments,
    public_key_of,
    required_mechanisms,
    signer,
)
from keyd.backends.pkcs11.token import Token, TokenState, WorkerSession
from keyd.config import Pkcs11TokenConfig
from keyd.core.keys import PublicKey
from keyd.core.keytypes import KeyType, SignatureEncoding
from keyd.core.model import KeyRecord
from keyd.core.signing import SignInput
from keyd.errors import FailedPrecondition, Internal, InvalidArgument, KeydError, SecretError
from keyd.secretfile import find_secret, read_pin

log = logging.getLogger("keyd.pkcs11")

FAMILY = "pkcs11"
CKA_ID_BYTES = 16
MAX_PIN_BYTES = 256
# The private-key attributes `keyd keys show` reads back from the token.
_SHOWN_ATTRIBUTES = {
    "extractable": Attribute.EXTRACTABLE,
    "sensitive": Attribute.SENSITIVE,
    "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "generated_on_token": Attribute.LOCAL,
}


def backend_name(token_name: str) -> str:
    return f"{FAMILY}:{token_name}"


def load_pin(token_name: str, config: Pkcs11TokenConfig) -> str:
    """The token's user PIN: a systemd credential first, then the configured file."""
    path = find_secret(config.pin_credential(token_name), config.pin_file)
    if path is None:
        raise SecretError(
            f"no PIN for PKCS#11 token {token_name!r}: set [pkcs11.{token_name}] pin_file, "
            f"or run under systemd with LoadCredential={config.pin_credential(token_name)}:FILE"
        )
    return read_pin(path, f"PIN file of token {token_name!r}", MAX_PIN_BYTES)


def _device_error(token: Token, action: str, exc: p11_errors.PKCS11Error) -> KeydError:
    if isinstance(exc, p11_errors.MechanismInvalid | p11_errors.FunctionNotSupported):
        return InvalidArgument(f"{token.describe()} cannot {action}: {type(exc).__name__}")
    return Internal(f"{token.describe()} failed to {action}: {type(exc).__name__}")


class Pkcs11Backend(Backend):
    always_verify = True

    def __init__(self, token_name: str, config: Pkcs11TokenConfig) -> None:
        self.name = backend_name(token_name)
        self.max_in_flight = config.max_requests
        self._config = config
        # Read once now, so that a missing or unsafe PIN file stops the start.
        load_pin(token_name, config)
        self._token = Token(token_name, config, lambda: load_pin(token_name, config))

    # -- keys ------------------------------------------------------------------------

    def _location(self, cka_id: bytes, cka_label: str) -> dict[str, str]:
        facts = self._token.facts
        return {
            "module": str(self._config.module),
            "token": self._token.name,
            "token_label": facts.label if facts else self._config.token_label,
            "token_serial": facts.serial if facts else self._config.token_serial,
            "cka_id": cka_id.hex(),
            "cka_label": cka_label,
        }

    def generate(self, key_type: KeyType, *, role: str = "", slot: str = "") -> GeneratedKey:
        arguments = generation_arguments(key_type)

        def create(ws: WorkerSession) -> tuple[PublicKey, bytes, str]:
            # Drawn per attempt: a retried generation never makes two keys with one ID.
            cka_id = secrets.token_bytes(CKA_ID_BYTES)
            available = set(ws.session.token.slot.get_mechanisms())
            missing = [m.name for m in required_mechanisms(key_type) if m not in available]
            if missing:
                raise InvalidArgument(
                    f"{self._token.describe()} does not support {key_type.value} "
                    f"(missing {', '.join(missing)})"
                )
            public_obj, private_obj = ws.session.generate_keypair(
                store=True,
                id=cka_id,
                label="keyd",
                private_template=PRIVATE_TEMPLATE,
                **arguments,  # type: ignore[arg-type]
            )
            try:
                public = public_key_of(public_obj)
            except KeydError:
                public_obj.destroy()
                private_obj.destroy()
                raise
            # Label both objects with the key ID, for people reading the token.
            label = public.notary_key_id
            try:
                public_obj[Attribute.LABEL] = label
                private_obj[Attribute.LABEL] = label
            except p11_errors.PKCS11Error:
                label = "keyd"
            return public, cka_id, label

        try:
            public, cka_id, label = self._token.run(create, rw=True)
        except p11_errors.PKCS11Error as exc:
            raise _device_error(self._token, f"generate a {key_type.value} key", exc) from None
        log.info(
            "key generated on token", extra={"token": self._token.name, "cka_id": cka_id.hex()}
        )
        return GeneratedKey(public, location=self._location(cka_id, label))

    def adopt(self, ref: DeviceKeyRef) -> GeneratedKey:
        """Record a key made elsewhere (a ceremony, pkcs11-tool) by CKA_ID and/or label."""
        query: dict[str, object] = {}
        if ref.id:
            try:
                query["id"] = bytes.fromhex(ref.id)
            except ValueError:
                raise InvalidArgument(f"CKA_ID {ref.id!r} is not hex") from None
        if ref.label:
            query["label"] = ref.label
        if not query:
            raise InvalidArgument("name the key to adopt by its CKA_ID (hex) or its label")
        wanted = " and ".join(
            f"{k} {v!r}" for k, v in (("CKA_ID", ref.id), ("label", ref.label)) if v
        )

        def find(ws: WorkerSession) -> tuple[PublicKey, bytes, str]:
            try:
                private = ws.session.get_key(object_class=ObjectClass.PRIVATE_KEY, **query)  # type: ignore[arg-type]
            except p11_errors.MultipleObjectsReturned:
                raise InvalidArgument(
                    f"several private keys have {wanted}; use the CKA_ID"
                ) from None
            if private[Attribute.EXTRACTABLE] or not private[Attribute.SENSITIVE]:
                raise FailedPrecondition(
                    f"the key with {wanted} can leave the token (CKA_EXTRACTABLE true or "
                    "CKA_SENSITIVE false); keyd adopts only keys that cannot"
                )
            if not private[Attribute.PRIVATE]:
                raise FailedPrecondition(
                    f"the key with {wanted} can be used without the PIN (CKA_PRIVATE false); "
                    "keyd adopts only keys that need a login"
                )
            cka_id = bytes(private[Attribute.ID])
            # keyd finds the key by CKA_ID alone from now on: it must name one key.
            same_id = list(
                ws.session.get_objects(
                    {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id}
                )
            )
            if not cka_id or len(same_id) != 1:
                raise FailedPrecondition(
                    f"the key with {wanted} has an empty CKA_ID or shares it with another "
                    "private key; give it a unique CKA_ID first"
                )
            label = str(private[Attribute.LABEL])
            try:
                public_obj = ws.session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=cka_id)
            except p11_errors.NoSuchKey:
                raise FailedPrecondition(
                    f"the token has no public-key object with CKA_ID {cka_id.hex()}; keyd reads "
                    "the public key from it. Import the public key to the token first"
                ) from None
            except p11_errors.MultipleObjectsReturned:
                raise FailedPrecondition(
                    f"the token has several public-key objects with CKA_ID {cka_id.hex()}"
                ) from None
            public = public_key_of(public_obj)
            # The public object only claims to match: prove it with a signature.
            challenge = SignInput.of_message(secrets.token_bytes(32))
            (signature,) = signer(public.key_type, prehashed=False)(
                typing.cast(pkcs11.SignMixin, private), [challenge.payload]
            )
            if not public.verify(signature, challenge, SignatureEncoding.DER):
                raise FailedPrecondition(
                    f"the public-key object with CKA_ID {cka_id.hex()} does not belong to the "
                    "private key; keyd does not adopt it"
                )
            return public, cka_id, label

        try:
            public, cka_id, label = self._token.run(find)
        except p11_errors.NoSuchKey:
            raise InvalidArgument(
                f"{self._token.describe()} has no private key with {wanted}"
            ) from None
        except p11_errors.PKCS11Error as exc:
            raise _device_error(self._token, "read the key", exc) from None
        return GeneratedKey(public, location=self._location(cka_id, label))

    def _cka_id(self, record: KeyRecord) -> bytes:
        return bytes.fromhex(record.location["cka_id"])

    def sign(self, record: KeyRecord, payloads: Sequence[bytes], *, prehashed: bool) -> list[bytes]:
        cka_id = self._cka_id(record)
        sign_many = signer(record.key_type, prehashed=prehashed)

        def sign(ws: WorkerSession) -> list[bytes]:
            return sign_many(ws.private_key(cka_id), payloads)

        try:
            return self._token.run(sign)
        except p11_errors.NoSuchKey:
            raise FailedPrecondition(
                f"key {record.key_id} (CKA_ID {cka_id.hex()}) is not on {self._token.describe()}; "
                "was the token replaced, or the key deleted outside keyd?"
            ) from None
        except p11_errors.PKCS11Error as exc:
            raise _device_error(self._token, "sign", exc) from None

    def describe(self, record: KeyRecord) -> Mapping[str, str]:
        """Facts read from the token now: whether the private key can leave it."""
        cka_id = self._cka_id(record)

        def read(ws: WorkerSession) -> dict[str, str]:
            key = ws.private_key(cka_id)
            return {name: str(bool(key[attr])).lower() for name, attr in _SHOWN_ATTRIBUTES.items()}

        try:
            return self._token.run(read)
        except KeydError as exc:
            return {"device_status": exc.message}
        except p11_errors.NoSuchKey:
            return {"device_status": "the key is not on the token"}
        except p11_errors.PKCS11Error as exc:
            return {"device_status": f"cannot read the key's attributes ({type(exc).__name__})"}

    def delete(self, record: KeyRecord) -> None:
        # Hardware keys are forgotten, not destroyed: a root key destroyed by a
        # mistaken delete cannot be recovered. It stays on the token (adoptable).
        log.warning(
            "token key forgotten; it remains on the token",
            extra={"key_id": record.key_id, "cka_id": record.location.get("cka_id", "")},
        )

    def destroy(self, record: KeyRecord) -> None:
        """Destroy the key's objects on the token (never for a plain delete)."""
        cka_id = self._cka_id(record)

        def destroy(ws: WorkerSession) -> None:
            for obj in ws.session.get_objects({Attribute.ID: cka_id}):
                obj.destroy()

        try:
            self._token.run(destroy, rw=True)
        except p11_errors.PKCS11Error as exc:
            raise _device_error(self._token, "destroy a key", exc) from None

    # -- state ---------------------------------------------------------------------------

    def health(self) -> BackendHealth:
        self._token.check()
        token = self._token
        facts = token.facts
        detail = token.detail
        if token.state is TokenState.CONNECTED and facts is not None:
            detail = (
                f"token {facts.label!r} serial {facts.serial} ({facts.manufacturer} "
                f"{facts.model}) via {self._config.module}"
            )
            warnings = facts.pin_warnings()
            if warnings:
                detail += f"; PIN flags: {', '.join(warnings)}"
        return BackendHealth(
            self.name, token.state is TokenState.CONNECTED, detail, token.state.value
        )

    def warm_up(self) -> None:
        """Find the token and log in before the first request needs it."""
        self._token.check()

    def close(self) -> None:
        self._token.close()
