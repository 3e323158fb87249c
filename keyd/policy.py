"""Who may do what with which keys: the authorization policy (issue 6).

The policy file holds `[[allow]]` rules. Each grants some operations on the keys
its selectors match to the callers it names; nothing else is allowed, and no
caller is special: root signs only when a rule names root or one of its groups.
An empty file denies everything.

A Policy never changes once built. The daemon loads it at start and, on SIGHUP,
builds a new one with `Policy.load(policy.path)`, keeping the old one when that
raises PolicyError; the decision caches go away with the old object.

Example (docs/policy.example.toml describes every field):

    [[allow]]
    name = "ci signs release targets"
    users = ["ci"]
    operations = ["sign", "list"]
    roles = ["targets", "targets/*"]
    collections = ["docker.io/acme/*"]
"""

from __future__ import annotations

import grp
import logging
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import translate
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

from keyd.config import read_toml
from keyd.core.identity import Caller, Operation
from keyd.core.model import KeyRecord, check_collection, check_key_id, check_labels, check_role
from keyd.errors import ConfigError, InvalidArgument, PermissionDenied

_log = logging.getLogger(__name__)

# Each cache is emptied when it grows past this: enough for every (caller, key)
# pair of a busy host, and no caller can grow it without bound. A full decision
# cache holds about 11 MiB besides the records it refers to.
MAX_CACHE_ENTRIES = 65536

_RULE_FIELDS = (
    "name",
    "users",
    "groups",
    "operations",
    "roles",
    "collections",
    "backends",
    "labels",
    "key_ids",
)
_GLOB_CHARS = frozenset("*?[")
# What a glob may contain besides the glob characters: the characters of the names it matches.
_ROLE_GLOB = re.compile(r"[A-Za-z0-9._/*?\[\]!-]{1,128}")
_COLLECTION_GLOB = re.compile(r"[A-Za-z0-9._:/*?\[\]!-]{1,255}")
_BACKEND_GLOB = re.compile(r"[a-z0-9_:*?\[\]!-]{1,66}")
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no user" to the kernel
_VERBS = {
    Operation.CREATE: "create",
    Operation.SIGN: "sign with",
    Operation.LIST: "see",
    Operation.DELETE: "delete",
    Operation.ADMIN: "administer",
}


class PolicyError(ConfigError):
    """The policy file is unreadable or invalid; names the file, the rule and the field."""


@dataclass(frozen=True, kw_only=True)
class KeyTarget:
    """The key a request acts on, as the policy sees it. At creation time the key
    has no ID yet: key_id is "" and the other fields are what the caller asked for."""

    key_id: str = ""
    role: str = ""
    collection: str = ""
    backend: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @classmethod
    def of(cls, record: KeyRecord) -> KeyTarget:
        return cls(
            key_id=record.key_id,
            role=record.role,
            collection=record.collection,
            backend=record.backend,
            labels=record.labels,
        )


# What the policy decides on. A KeyRecord has every field of a KeyTarget: the daemon
# passes records as they are, saving the building of a KeyTarget on every Sign.
Target = KeyTarget | KeyRecord


def _describe(target: Target) -> str:
    """How denials name the target: only what the caller itself sent or named."""
    if target.key_id:
        return f"key {target.key_id}"
    asked = (("role", target.role), ("collection", target.collection), ("backend", target.backend))
    shown = [f"{name} {value!r}" for name, value in asked if value]
    return "a key with " + ", ".join(shown) if shown else "a key"


def _same_key(a: Target, b: Target) -> bool:
    """Whether two targets with one key ID look the same to every selector. They may
    not: a key purged, then adopted again under another role."""
    return a is b or (
        a.role == b.role
        and a.collection == b.collection
        and a.backend == b.backend
        and a.labels == b.labels
    )


@dataclass(frozen=True)
class Rule:
    """One `[[allow]]` table, with names resolved to ids and globs compiled."""

    number: int  # 1-based, in file order
    name: str
    uids: frozenset[int]
    gids: frozenset[int]
    operations: frozenset[Operation]
    # None: the selector was left out and matches every key.
    roles: re.Pattern[str] | None = None
    collections: re.Pattern[str] | None = None
    backends: re.Pattern[str] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    key_ids: frozenset[str] | None = None

    def applies_to(self, caller: Caller) -> bool:
        return (
            caller.uid in self.uids
            or caller.gid in self.gids
            or not self.gids.isdisjoint(caller.groups)
        )

    def matches(self, target: Target) -> bool:
        # A key with no ID yet (creation) is never in key_ids: key_ids cannot grant create.
        return (
            (self.key_ids is None or target.key_id in self.key_ids)
            and (self.roles is None or self.roles.match(target.role) is not None)
            and (self.collections is None or self.collections.match(target.collection) is not None)
            and (self.backends is None or self.backends.match(target.backend) is not None)
            and all(target.labels.get(k) == v for k, v in self.labels.items())
        )

    def describe(self) -> str:
        """For debug logs only: denials never show rules."""
        return f"rule #{self.number} ({self.name})" if self.name else f"rule #{self.number}"


# The rules that apply to one caller, by the operations they grant.
_Grants = Mapping[Operation, tuple[Rule, ...]]
_CallerKey = tuple[int, int, frozenset[int]]
_DecisionKey = tuple[int, int, frozenset[int], Operation, str]
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True, eq=False, kw_only=True)
class Policy:
    """A validated policy: default deny, first matching rule grants."""

    rules: tuple[Rule, ...] = ()
    # The file it was read from; None when built from a dict.
    path: Path | None = None
    # Caches, filled as callers come (see allows). Plain dicts: under the GIL a
    # racing thread at worst computes the same answer twice.
    _callers: dict[_CallerKey, _Grants] = field(default_factory=dict, init=False, repr=False)
    # By caller, operation and key ID: the target decided on, and the decision.
    _decisions: dict[_DecisionKey, tuple[Target, bool]] = field(
        default_factory=dict, init=False, repr=False
    )

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read and validate a policy file; raises PolicyError naming file, rule and field."""
        try:
            data = read_toml(path)
        except ConfigError as exc:
            raise PolicyError(exc.message) from None
        return cls(rules=_parse(data, str(path)), path=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> Policy:
        """Validate a parsed policy; `source` names it in errors (usually the file)."""
        return cls(rules=_parse(data, source))

    @property
    def rule_count(self) -> int:
        """How many rules; 0 means every request is denied (the daemon warns)."""
        return len(self.rules)

    def allows(self, caller: Caller, op: Operation, target: Target) -> bool:
        """Whether some rule grants `op` on `target` to `caller`."""
        if not target.key_id:  # creating a key: rare, so not cached
            return self._decide(caller, op, target)
        key = (caller.uid, caller.gid, caller.groups, op, target.key_id)
        cached = self._decisions.get(key)
        if cached is not None and _same_key(cached[0], target):
            return cached[1]
        decision = self._decide(caller, op, target)
        _remember(self._decisions, key, (target, decision))
        return decision

    def check(self, caller: Caller, op: Operation, target: Target) -> None:
        """Raise PermissionDenied unless `caller` may do `op` on `target`. The message
        names the missing permission, never the policy's rules."""
        if not self.allows(caller, op, target):
            which = "on that key" if target.key_id else "for such a key"
            raise PermissionDenied(
                f"{caller.describe()} may not {_VERBS[op]} {_describe(target)}: the policy "
                f"grants it no {op.value!r} permission {which}; ask keyd's administrator "
                "to grant it in the policy file"
            )

    def allows_any(self, caller: Caller, op: Operation) -> bool:
        """Whether some rule grants `op` to `caller` on some keys."""
        return op in self._grants(caller)

    def check_any(self, caller: Caller, op: Operation) -> None:
        """For requests that name no key (ListKeys, GetStatus): raise PermissionDenied
        unless some rule grants `op` to `caller` on at least some keys."""
        if not self.allows_any(caller, op):
            raise PermissionDenied(
                f"{caller.describe()} may not {op.value} keys: the policy grants it no "
                f"{op.value!r} permission on any key; ask keyd's administrator to grant it "
                "in the policy file"
            )

    def _grants(self, caller: Caller) -> _Grants:
        key = (caller.uid, caller.gid, caller.groups)
        grants = self._callers.get(key)
        if grants is None:
            applicable = [rule for rule in self.rules if rule.applies_to(caller)]
            by_op = {op: tuple(r for r in applicable if op in r.operations) for op in Operation}
            grants = MappingProxyType({op: rules for op, rules in by_op.items() if rules})
            _remember(self._callers, key, grants)
        return grants

    def _decide(self, caller: Caller, op: Operation, target: Target) -> bool:
        for rule in self._grants(caller).get(op, ()):
            if rule.matches(target):
                _log.debug("%s grants %s to %s", rule.describe(), op.value, caller.describe())
                return True
        _log.debug("no rule grants %s on %s to %s", op.value, _describe(target), caller.describe())
        return False


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    if len(cache) >= MAX_CACHE_ENTRIES:
        cache.clear()
    cache[key] = value


# -- parsing -------------------------------------------------------------------


def _parse(data: Mapping[str, Any], source: str) -> tuple[Rule, ...]:
    for name in data:
        if name != "allow":
            raise PolicyError(
                f"{source}: [{name}]: unknown section; a policy holds only [[allow]] rules"
            )
    tables = data.get("allow", [])
    if not isinstance(tables, list):
        raise PolicyError(f"{source}: allow: must be [[allow]] tables, not a single value")
    rules = []
    for number, table in enumerate(tables, start=1):
        if not isinstance(table, dict):
            raise PolicyError(f"{source}: [[allow]] #{number}: must be a table")
        rules.append(_RuleParser(source, number, table).parse())
    return tuple(rules)


class _RuleParser:
    def __init__(self, source: str, number: int, table: dict[str, Any]) -> None:
        self._source = source
        self._number = number
        self._table = table

    def fail(self, name: str, problem: str) -> NoReturn:
        raise PolicyError(f"{self._source}: [[allow]] #{self._number} {name}: {problem}")

    def parse(self) -> Rule:
        for name in self._table:
            if name not in _RULE_FIELDS:
                self.fail(name, f"unknown field; a rule takes {', '.join(_RULE_FIELDS)}")
        name = self._table.get("name", "")
        if not isinstance(name, str):
            self.fail("name", f"must be a string, not {type(name).__name__}")
        uids = frozenset(self._ids("users", _USERS))
        gids = frozenset(self._ids("groups", _GROUPS))
        if not (uids or gids):
            # A rule for everyone is never an accident worth allowing.
            self.fail("users", "a rule must name at least one user or group (or both)")
        return Rule(
            number=self._number,
            name=name,
            uids=uids,
            gids=gids,
            operations=self._operations(),
            roles=self._globs("roles", "role", _ROLE_GLOB, check_role),
            collections=self._globs(
                "collections", "collection", _COLLECTION_GLOB, check_collection
            ),
            backends=self._globs("backends", "backend", _BACKEND_GLOB, None, family=True),
            labels=self._labels(),
            key_ids=self._key_ids(),
        )

    def _list(self, name: str, what: str) -> list[Any] | None:
        """The field's entries; None when it is left out."""
        raw = self._table.get(name)
        if raw is None:
            return None
        if not isinstance(raw, list):
            self.fail(name, f"must be a list, such as [{_example(name)}]")
        if not raw:
            # An empty selector would match nothing: say so instead of silently denying.
            self.fail(name, f"is empty; name at least one {what} or leave {name} out")
        return raw

    def _ids(self, name: str, kind: _Accounts) -> list[int]:
        ids = []
        for entry in self._list(name, f"{kind.noun} name or {kind.id_name}") or []:
            if isinstance(entry, int) and not isinstance(entry, bool):
                if not 0 <= entry <= _MAX_ID:
                    self.fail(name, f"{entry} is not a valid {kind.id_name} (0 to {_MAX_ID})")
                ids.append(entry)
            elif isinstance(entry, str):
                resolved = kind.resolve(entry)
                if resolved is None:
                    hint = (
                        f"; write a numeric {kind.id_name} without quotes: {entry}"
                        if entry.isdigit()
                        else f" (check the name with `getent {kind.database} {entry}`)"
                    )
                    self.fail(name, f"no {kind.noun} named {entry!r} on this host{hint}")
                ids.append(resolved)
            else:
                self.fail(name, f"{entry!r} is neither a {kind.noun} name nor a {kind.id_name}")
        return ids

    def _operations(self) -> frozenset[Operation]:
        choices = ", ".join(op.value for op in Operation)
        entries = self._list("operations", "operation")
        if entries is None:
            self.fail("operations", f"is required: a list of {choices}")
        ops = set()
        for entry in entries:
            if not isinstance(entry, str) or entry not in {op.value for op in Operation}:
                self.fail("operations", f"{entry!r} is not one of {choices}")
            ops.add(Operation(entry))
        return frozenset(ops)

    def _globs(
        self,
        name: str,
        what: str,
        allowed: re.Pattern[str],
        check: Callable[[str], str] | None,
        *,
        family: bool = False,
    ) -> re.Pattern[str] | None:
        entries = self._list(name, f"{what} glob")
        if entries is None:
            return None
        patterns = []
        for entry in entries:
            if not isinstance(entry, str):
                self.fail(name, f"{entry!r} is not a {what} glob (a string)")
            if not entry:
                # "" matches keys without a role or collection; every key has a backend.
                if check is None:
                    self.fail(name, f"an empty string matches no {what}")
            elif check is None or _GLOB_CHARS.intersection(entry):
                if not allowed.fullmatch(entry):
                    self.fail(
                        name,
                        f"invalid {what} glob {entry!r}: use the characters a {what} may hold "
                        "and the glob characters * ? [ ]",
                    )
            else:
                try:
                    check(entry)
                except InvalidArgument as exc:
                    self.fail(name, exc.message)
            patterns.append(translate(entry))
            if family and ":" not in entry:
                # As in `keyd keys list --backend pkcs11`: a family name selects its members.
                patterns.append(translate(entry + ":*"))
        # One regex per selector: matching costs one call however many globs it lists.
        return re.compile("|".join(patterns))

    def _labels(self) -> Mapping[str, str]:
        raw = self._table.get("labels")
        if raw is None:
            return MappingProxyType({})
        if not isinstance(raw, dict):
            self.fail("labels", 'must be a table, such as { team = "web" }')
        if not raw:
            self.fail("labels", "is empty; name at least one label or leave labels out")
        for label, value in raw.items():
            if not isinstance(value, str):
                self.fail("labels", f"the value of {label!r} must be a string")
        try:
            return check_labels(raw)
        except InvalidArgument as exc:
            self.fail("labels", exc.message)

    def _key_ids(self) -> frozenset[str] | None:
        entries = self._list("key_ids", "key ID")
        if entries is None:
            return None
        for entry in entries:
            if not isinstance(entry, str):
                self.fail("key_ids", f"{entry!r} is not a key ID (a string)")
            try:
                check_key_id(entry)
            except InvalidArgument as exc:
                self.fail("key_ids", exc.message)
        return frozenset(entries)


def _example(name: str) -> str:
    return {
        "users": '"ci", 1001',
        "groups": '"keyd-admin"',
        "operations": '"sign", "list"',
        "roles": '"targets", "targets/*"',
        "collections": '"docker.io/acme/*"',
        "backends": '"store", "pkcs11:*"',
        "key_ids": '"<64 hex characters>"',
    }[name]


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@dataclass(frozen=True)
class _Accounts:
    """Users or groups: how rules name them and how names become ids."""

    noun: str
    id_name: str
    database: str  # for `getent`
    resolve: Callable[[str], int | None]


_USERS = _Accounts("user", "uid", "passwd", _uid_of)
_GROUPS = _Accounts("group", "gid", "group", _gid_of)
