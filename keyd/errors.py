"""keyd's exceptions: one root type, one subclass per kind of failure.

Every message is meant for the caller: it says what went wrong and what to do,
and never contains a secret or a payload. The daemon maps each kind to one gRPC
status code (keyd.wire) and the client maps it back, so callers on either side of
the socket catch the same types.
"""


class KeydError(Exception):
    """Root of all keyd errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KeydError):
    """The request is malformed: bad key ID, unsupported type, wrong digest length..."""


class PayloadTooLarge(InvalidArgument):
    """The payload is larger than the configured limit."""


class NotFound(KeydError):
    """No key with that ID."""


class AlreadyExists(KeydError):
    """A key with that ID is already known."""


class FailedPrecondition(KeydError):
    """The key or backend is not in a state that allows the operation."""


class PermissionDenied(KeydError):
    """The caller may not do this."""


class Unauthenticated(KeydError):
    """keyd cannot tell who is calling: the connection did not come through its socket."""


class Unavailable(KeydError):
    """A backend, device or the daemon itself cannot be reached right now; retry later."""


class Unreachable(Unavailable):
    """The client could not reach keyd at all (nothing was done): safe to retry."""


class AuditUnavailable(Unavailable):
    """The audit log cannot be written (disk full, permissions): the request was refused."""


class ResourceExhausted(KeydError):
    """Too many requests in flight for a backend, or a message over the transport limit."""


class Internal(KeydError):
    """A fault inside keyd or a device (for example a signature that does not verify)."""


class ConfigError(KeydError):
    """The configuration file is unreadable or invalid; names the file and field."""


class StoreError(KeydError):
    """The encrypted store cannot be created or opened (wrong secret, damage, permissions)."""


class SecretError(KeydError):
    """A secret (store key, passphrase) is missing, malformed or unsafely stored."""


class StartupError(KeydError):
    """The daemon cannot start: socket in use, unsafe directory, unknown group..."""
