"""The authorization policy: default deny, nobody special, errors that name file, rule and field.

Names are resolved against this host's real accounts: root (uid 0) and its group
(gid 0) exist everywhere; other principals are numeric ids, so no account is created.
"""

from __future__ import annotations

import grp
import pwd
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyd import policy as policy_module
from keyd.core.identity import Caller, Operation
from keyd.core.keys import PublicKey
from keyd.core.model import KeyRecord
from keyd.errors import ConfigError, PermissionDenied
from keyd.policy import KeyTarget, Policy, PolicyError

ROOT_USER = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name
KEY_A = "a" * 64
KEY_B = "b" * 64
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "policy.example.toml"

ROOT = Caller(uid=0, gid=0, pid=1, groups=frozenset({0}), user=ROOT_USER)
CI = Caller(uid=1001, gid=1001, pid=42, groups=frozenset({1001}), user="ci")
# Same primary group as CI, plus the supplementary group 2000 ("release").
RELEASER = Caller(uid=1002, gid=1001, pid=43, groups=frozenset({1001, 2000}))
STRANGER = Caller(uid=1003, gid=1003, pid=44, groups=frozenset({1003}))

TARGETS = KeyTarget(
    key_id=KEY_A,
    role="targets",
    collection="docker.io/acme/web",
    backend="store",
    labels={"team": "web"},
)


def _load(tmp_path: Path, text: str) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return Policy.load(path)


def _policy(*rules: dict[str, Any]) -> Policy:
    return Policy.from_dict({"allow": list(rules)}, "test")


def _fields(target: KeyTarget) -> dict[str, Any]:
    return {
        "key_id": target.key_id,
        "role": target.role,
        "collection": target.collection,
        "backend": target.backend,
        "labels": target.labels,
    }


def _target(**changes: Any) -> KeyTarget:
    """TARGETS with some fields changed."""
    return KeyTarget(**(_fields(TARGETS) | changes))


# -- parsing ---------------------------------------------------------------------


def test_a_full_rule(tmp_path: Path) -> None:
    policy = _load(
        tmp_path,
        f"""
        [[allow]]
        name = "ci signs release targets"
        users = ["{ROOT_USER}", 1001]
        groups = ["{ROOT_GROUP}", 2000]
        operations = ["sign", "list"]
        roles = ["targets", "targets/*"]
        collections = ["docker.io/acme/*"]
        backends = ["store", "pkcs11:*"]
        labels = {{ team = "web" }}
        key_ids = ["{KEY_A}"]
        """,
    )
    assert policy.path == tmp_path / "policy.toml"
    assert policy.rule_count == 1
    (rule,) = policy.rules
    assert (rule.number, rule.name) == (1, "ci signs release targets")
    assert rule.uids == {0, 1001}
    assert rule.gids == {0, 2000}
    assert rule.operations == {Operation.SIGN, Operation.LIST}
    assert dict(rule.labels) == {"team": "web"}
    assert rule.key_ids == frozenset({KEY_A})
    assert policy.allows(CI, Operation.SIGN, TARGETS)


@pytest.mark.parametrize("text", ["", "# nothing granted yet\n", "allow = []\n"])
def test_a_policy_without_rules_is_valid_and_denies_everything(tmp_path: Path, text: str) -> None:
    policy = _load(tmp_path, text)
    assert policy.rule_count == 0
    for caller in (ROOT, CI):
        for op in Operation:
            assert not policy.allows(caller, op, TARGETS)
            assert not policy.allows_any(caller, op)


OPS = "operations = ['sign']"
WHO = "users = [1001]"


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (f"users = ['keyd-test-no-such-user']\n{OPS}", "users: no user named 'keyd-test-no-such-u"),
        (f"groups = ['keyd-test-no-such-group']\n{OPS}", "groups: no group named 'keyd-test-no-s"),
        (f"users = ['1001']\n{OPS}", "users: no user named '1001' on this host; write a numeric"),
        (f"users = [true]\n{OPS}", "users: True is neither a user name nor a uid"),
        (f"users = [-1]\n{OPS}", "users: -1 is not a valid uid"),
        (f"groups = [4294967295]\n{OPS}", "groups: 4294967295 is not a valid gid"),
        (f"users = 'ci'\n{OPS}", r"users: must be a list, such as \[\"ci\", 1001\]"),
        (f"users = []\n{OPS}", "users: is empty"),
        (f"name = 'x'\n{OPS}", "users: a rule must name at least one user or group"),
        (f"{WHO}\noperations = []", "operations: is empty"),
        (f"{WHO}\noperations = ['sign', 'rotate']", "operations: 'rotate' is not one of create,"),
        (f"{WHO}\noperations = ['SIGN']", "operations: 'SIGN' is not one of"),
        (f"{WHO}\n{OPS}\nroles = []", "roles: is empty; name at least one role glob or leave"),
        (f"{WHO}\n{OPS}\nroles = ['targets', 3]", "roles: 3 is not a role glob"),
        (f"{WHO}\n{OPS}\nroles = ['tar gets']", "roles: invalid role 'tar gets'"),
        (f"{WHO}\n{OPS}\nroles = ['tar gets*']", r"roles: invalid role glob 'tar gets\*'"),
        (f"{WHO}\n{OPS}\ncollections = ['a.io/ *']", "collections: invalid collection glob"),
        (f"{WHO}\n{OPS}\ncollections = ['-x']", "collections: invalid collection '-x'"),
        (f"{WHO}\n{OPS}\nbackends = ['']", "backends: an empty string matches no backend"),
        (f"{WHO}\n{OPS}\nbackends = ['Store']", "backends: invalid backend glob 'Store'"),
        (f"{WHO}\n{OPS}\nlabels = ['team']", "labels: must be a table"),
        (f"{WHO}\n{OPS}\nlabels = {{}}", "labels: is empty"),
        (f"{WHO}\n{OPS}\nlabels = {{ team = 3 }}", "labels: the value of 'team' must be a string"),
        (f"{WHO}\n{OPS}\nlabels = {{ Team = 'web' }}", "labels: invalid label name 'Team'"),
        (f"{WHO}\n{OPS}\nkey_ids = ['ABC']", "key_ids: malformed key ID 'ABC': expected 64 lower"),
        (f"{WHO}\n{OPS}\nkey_ids = ['{KEY_A.upper()}']", "key_ids: malformed key ID"),
        (f"{WHO}\n{OPS}\nname = 3", "name: must be a string, not int"),
        (f"{WHO}\n{OPS}\nuser = ['ci']", "user: unknown field; a rule takes name, users, groups,"),
        (WHO, r"operations: is required: a list of create, sign, list, delete, admin"),
    ],
)
def test_a_bad_rule_names_file_rule_and_field(tmp_path: Path, rule: str, expected: str) -> None:
    # Rule #1 is fine: the message must point at the second.
    text = f"[[allow]]\ngroups = [0]\noperations = ['list']\n\n[[allow]]\n{rule}\n"
    with pytest.raises(PolicyError, match=expected) as info:
        _load(tmp_path, text)
    assert info.value.message.startswith(f"{tmp_path / 'policy.toml'}: [[allow]] #2 ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[allows]\nusers = [1]\n", r": \[allows\]: unknown section; a policy holds only"),
        ("version = 1\n", r": \[version\]: unknown section"),
        ("allow = 3\n", ": allow: must be \\[\\[allow\\]\\] tables"),
        ("allow = [3]\n", r": \[\[allow\]\] #1: must be a table"),
        ("[[allow]\n", ": not valid TOML"),
        ("[[allow]]\nusers = [1001\n", ": not valid TOML"),
    ],
)
def test_a_bad_file_is_named(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(PolicyError, match=expected) as info:
        _load(tmp_path, text)
    assert info.value.message.startswith(f"{tmp_path / 'policy.toml'}: ")
    # The daemon's start-up path reports every configuration problem the same way.
    assert isinstance(info.value, ConfigError)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=f"{tmp_path / 'missing.toml'}: cannot read"):
        Policy.load(tmp_path / "missing.toml")


def test_a_rejected_reload_leaves_the_running_policy_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[[allow]]\nusers = [1001]\noperations = ['sign']\n")
    running = Policy.load(path)
    path.write_text("[[allow]]\nusers = ['keyd-test-no-such-user']\noperations = ['sign']\n")
    with pytest.raises(PolicyError, match="#1 users: no user named"):
        running = Policy.load(path)
    assert running.allows(CI, Operation.SIGN, TARGETS)


def test_the_documented_example_means_what_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    # The example names accounts this host lacks: stand in for the account database.
    users = {"ci": 1001, "keyd-notary": 995}
    groups = {"keyd-admin": 990}
    monkeypatch.setattr(pwd, "getpwnam", lambda name: SimpleNamespace(pw_uid=users[name]))
    monkeypatch.setattr(grp, "getgrnam", lambda name: SimpleNamespace(gr_gid=groups[name]))
    policy = Policy.load(EXAMPLE)
    admin = Caller(uid=1500, gid=1500, pid=7, groups=frozenset({1500, 990}))
    notary = Caller(uid=995, gid=995, pid=8, groups=frozenset({995}), user="keyd-notary")
    hsm_root = KeyTarget(key_id=KEY_B, role="root", backend="pkcs11:hsm")
    timestamp = KeyTarget(key_id=KEY_B, role="timestamp", collection="x.io/a", backend="store")

    assert all(policy.allows(admin, op, hsm_root) for op in Operation)
    assert policy.allows(CI, Operation.SIGN, TARGETS)
    assert policy.allows(CI, Operation.SIGN, _target(role="targets/releases", labels={}))
    assert not policy.allows(CI, Operation.SIGN, _target(collection="docker.io/other/web"))
    assert not policy.allows(CI, Operation.SIGN, _target(backend="pkcs11:hsm"))
    assert not policy.allows(CI, Operation.CREATE, _target(key_id=""))
    assert not policy.allows(CI, Operation.SIGN, hsm_root)
    assert policy.allows(
        notary, Operation.CREATE, KeyTarget(**(_fields(timestamp) | {"key_id": ""}))
    )
    assert policy.allows(notary, Operation.SIGN, timestamp)
    assert not policy.allows(notary, Operation.ADMIN, timestamp)
    assert not policy.allows(notary, Operation.SIGN, _target())
    for op in Operation:
        assert not policy.allows(ROOT, op, hsm_root)


# -- who ---------------------------------------------------------------------------


def test_root_gets_nothing_it_is_not_granted() -> None:
    policy = _policy(
        {"users": [1001], "groups": [1001], "operations": [op.value for op in Operation]}
    )
    for op in Operation:
        assert policy.allows(CI, op, TARGETS)
        assert not policy.allows(ROOT, op, TARGETS)
        assert not policy.allows_any(ROOT, op)


def test_root_is_granted_like_anyone_else() -> None:
    policy = _policy({"users": [ROOT_USER], "operations": ["sign"]})
    assert policy.allows(ROOT, Operation.SIGN, TARGETS)
    assert not policy.allows(ROOT, Operation.DELETE, TARGETS)


def test_users_match_by_uid_only() -> None:
    policy = _policy({"users": [1001], "operations": ["sign"]})
    assert policy.allows(CI, Operation.SIGN, TARGETS)
    # RELEASER shares CI's primary group, not its uid.
    assert not policy.allows(RELEASER, Operation.SIGN, TARGETS)


def test_groups_match_primary_and_supplementary_groups() -> None:
    by_supplementary = _policy({"groups": [2000], "operations": ["sign"]})
    assert by_supplementary.allows(RELEASER, Operation.SIGN, TARGETS)
    assert not by_supplementary.allows(CI, Operation.SIGN, TARGETS)
    by_primary = _policy({"groups": [1001], "operations": ["sign"]})
    assert by_primary.allows(CI, Operation.SIGN, TARGETS)
    assert by_primary.allows(RELEASER, Operation.SIGN, TARGETS)
    assert not by_primary.allows(STRANGER, Operation.SIGN, TARGETS)


def test_a_group_named_by_name(tmp_path: Path) -> None:
    policy = _load(tmp_path, f"[[allow]]\ngroups = ['{ROOT_GROUP}']\noperations = ['list']\n")
    in_group = Caller(uid=1004, gid=1004, pid=45, groups=frozenset({1004, 0}))
    assert policy.allows(in_group, Operation.LIST, TARGETS)
    assert not policy.allows(CI, Operation.LIST, TARGETS)


def test_only_the_granted_operations() -> None:
    policy = _policy({"users": [1001], "operations": ["sign", "list"]})
    assert policy.allows(CI, Operation.SIGN, TARGETS)
    assert policy.allows(CI, Operation.LIST, TARGETS)
    for op in (Operation.CREATE, Operation.DELETE, Operation.ADMIN):
        assert not policy.allows(CI, op, TARGETS)


def test_rules_add_up() -> None:
    policy = _policy(
        {"users": [1001], "operations": ["sign"], "roles": ["targets"]},
        {"groups": [1001], "operations": ["delete"], "roles": ["snapshot"]},
    )
    assert policy.allows(CI, Operation.SIGN, TARGETS)
    assert not policy.allows(CI, Operation.DELETE, TARGETS)
    assert policy.allows(CI, Operation.DELETE, _target(role="snapshot"))
    assert not policy.allows(CI, Operation.SIGN, _target(role="snapshot"))


# -- which keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "matching", "other"),
    [
        ({}, _target(), _target(key_id=KEY_B, role="root", backend="pkcs11:hsm", labels={})),
        ({"roles": ["targets"]}, _target(), _target(role="targets/releases")),
        ({"roles": ["targets/*"]}, _target(role="targets/a/b"), _target(role="targets")),
        ({"roles": ["t?rgets"]}, _target(), _target(role="targets/x")),
        ({"roles": ["[st]*"]}, _target(role="snapshot"), _target(role="root")),
        ({"roles": [""]}, _target(role=""), _target()),
        ({"collections": ["docker.io/acme/*"]}, _target(), _target(collection="docker.io/acme")),
        ({"collections": ["docker.io/acme/*"]}, _target(), _target(collection="docker.io/acmex/w")),
        ({"backends": ["store"]}, _target(), _target(backend="pkcs11:hsm")),
        ({"backends": ["pkcs11:*"]}, _target(backend="pkcs11:hsm"), _target()),
        ({"backends": ["pkcs11"]}, _target(backend="pkcs11:usb"), _target(backend="pkcs11x:a")),
        ({"labels": {"team": "web"}}, _target(), _target(labels={"team": "db"})),
        (
            {"labels": {"team": "web", "tier": "prod"}},
            _target(labels={"team": "web", "tier": "prod", "x": "y"}),
            _target(labels={"team": "web"}),
        ),
        ({"key_ids": [KEY_A, KEY_B]}, _target(key_id=KEY_B), _target(key_id="c" * 64)),
        (
            {"roles": ["targets"], "collections": ["docker.io/*"], "backends": ["store"]},
            _target(),
            _target(backend="pkcs11:hsm"),
        ),
    ],
)
def test_selectors(selector: dict[str, Any], matching: KeyTarget, other: KeyTarget) -> None:
    policy = _policy({"users": [1001], "operations": ["sign"], **selector})
    assert policy.allows(CI, Operation.SIGN, matching)
    assert policy.allows(CI, Operation.SIGN, other) is (selector == {})


def test_a_star_also_matches_keys_without_that_attribute() -> None:
    policy = _policy({"users": [1001], "operations": ["sign"], "collections": ["*"]})
    assert policy.allows(CI, Operation.SIGN, _target(collection=""))
    policy = _policy({"users": [1001], "operations": ["sign"], "collections": ["?*"]})
    assert not policy.allows(CI, Operation.SIGN, _target(collection=""))
    assert policy.allows(CI, Operation.SIGN, TARGETS)


def test_key_ids_cannot_grant_create() -> None:
    policy = _policy({"users": [1001], "operations": ["create", "sign"], "key_ids": [KEY_A]})
    assert policy.allows(CI, Operation.SIGN, TARGETS)
    assert not policy.allows(CI, Operation.CREATE, _target(key_id=""))
    # The operation is still granted on some keys.
    assert policy.allows_any(CI, Operation.CREATE)


def test_create_is_decided_on_what_the_caller_asks_for() -> None:
    policy = _policy({"users": [1001], "operations": ["create"], "roles": ["targets/*"]})
    assert policy.allows(CI, Operation.CREATE, KeyTarget(role="targets/releases", backend="store"))
    assert not policy.allows(CI, Operation.CREATE, KeyTarget(role="root", backend="store"))


def test_key_target_of_a_record() -> None:
    public = PublicKey.from_crypto(ed25519.Ed25519PrivateKey.generate().public_key())
    record = KeyRecord(
        public_key=public,
        backend="pkcs11:hsm",
        role="targets",
        collection="docker.io/acme/web",
        labels={"team": "web"},
    )
    target = KeyTarget.of(record)
    assert target == KeyTarget(
        key_id=record.key_id,
        role="targets",
        collection="docker.io/acme/web",
        backend="pkcs11:hsm",
        labels={"team": "web"},
    )
    assert dict(target.labels) == {"team": "web"}
    assert target != KeyTarget(**(_fields(target) | {"labels": {"team": "db"}}))


def _record(role: str, backend: str = "store") -> KeyRecord:
    public = PublicKey.from_crypto(ed25519.Ed25519PrivateKey.generate().public_key())
    return KeyRecord(public_key=public, backend=backend, role=role, collection="docker.io/acme/web")


def test_a_record_is_decided_as_its_target() -> None:
    policy = _policy({"users": [1001], "operations": ["sign"], "roles": ["targets"]})
    allowed, denied = _record("targets"), _record("root")
    for _ in range(2):  # cold, then warm
        assert policy.allows(CI, Operation.SIGN, allowed)
        assert policy.allows(CI, Operation.SIGN, KeyTarget.of(allowed))
        assert not policy.allows(CI, Operation.SIGN, denied)
        assert not policy.allows(CI, Operation.SIGN, KeyTarget.of(denied))
    with pytest.raises(PermissionDenied, match=f"may not sign with key {denied.key_id}: "):
        policy.check(CI, Operation.SIGN, denied)


def test_a_key_adopted_again_under_another_role_is_decided_again() -> None:
    policy = _policy({"users": [1001], "operations": ["sign"], "backends": ["store"]})
    on_store = _record("targets")
    assert policy.allows(CI, Operation.SIGN, on_store)
    # Same public key, so same key ID, now on a token the rule does not cover.
    on_token = KeyRecord(public_key=on_store.public_key, backend="pkcs11:hsm", role="targets")
    assert on_token.key_id == on_store.key_id
    assert not policy.allows(CI, Operation.SIGN, on_token)
    assert policy.allows(CI, Operation.SIGN, on_store)


# -- requests without a key ------------------------------------------------------------


def test_check_any() -> None:
    policy = _policy({"users": [1001], "operations": ["list"], "roles": ["nothing-has-this"]})
    policy.check_any(CI, Operation.LIST)
    with pytest.raises(PermissionDenied, match="may not sign keys: the policy grants it no 'sign'"):
        policy.check_any(CI, Operation.SIGN)
    with pytest.raises(PermissionDenied, match=r"^uid 1003, pid 44 may not list keys"):
        policy.check_any(STRANGER, Operation.LIST)


# -- denials -----------------------------------------------------------------------


def test_a_denial_names_the_caller_and_the_missing_permission_not_the_rules() -> None:
    policy = _policy(
        {
            "name": "secret-rule-name",
            "users": [1001, 31337],
            "operations": ["list"],
            "roles": ["hidden-role"],
            "collections": ["hidden.example/*"],
        }
    )
    with pytest.raises(PermissionDenied) as info:
        policy.check(CI, Operation.SIGN, TARGETS)
    message = info.value.message
    assert message.startswith(f"uid 1001 (ci), pid 42 may not sign with key {KEY_A}: ")
    assert "no 'sign' permission on that key" in message
    for secret in ("secret-rule-name", "31337", "hidden", "#1"):
        assert secret not in message

    with pytest.raises(PermissionDenied) as info:
        policy.check(CI, Operation.CREATE, KeyTarget(role="root", backend="store"))
    assert info.value.message.startswith(
        "uid 1001 (ci), pid 42 may not create a key with role 'root', backend 'store': "
        "the policy grants it no 'create' permission for such a key"
    )


def test_check_passes_what_allows_allows() -> None:
    policy = _policy({"users": [1001], "operations": ["sign"]})
    policy.check(CI, Operation.SIGN, TARGETS)
    with pytest.raises(PermissionDenied, match="may not delete key"):
        policy.check(CI, Operation.DELETE, TARGETS)


# -- caches ---------------------------------------------------------------------------


def test_cached_decisions_belong_to_their_caller_and_target() -> None:
    policy = _policy({"users": [1001], "operations": ["sign"], "roles": ["targets"]})
    for _ in range(3):  # cold, then warm
        assert policy.allows(CI, Operation.SIGN, TARGETS)
        assert not policy.allows(STRANGER, Operation.SIGN, TARGETS)
        assert not policy.allows(CI, Operation.DELETE, TARGETS)
        # The same key ID with another role (purged, then adopted again): decided afresh.
        assert not policy.allows(CI, Operation.SIGN, _target(role="root"))
    # A caller is its uid and groups, not its process.
    assert policy.allows(
        Caller(uid=1001, gid=1001, pid=9, groups=CI.groups), Operation.SIGN, TARGETS
    )
    assert not policy.allows(
        Caller(uid=1001, gid=1001, pid=9, groups=frozenset({1001, 5})),
        Operation.SIGN,
        _target(role="root"),
    )


def test_group_changes_are_different_callers() -> None:
    policy = _policy({"groups": [2000], "operations": ["sign"]})
    assert not policy.allows(CI, Operation.SIGN, TARGETS)
    joined = Caller(uid=1001, gid=1001, pid=50, groups=frozenset({1001, 2000}))
    assert policy.allows(joined, Operation.SIGN, TARGETS)


def test_caches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_module, "MAX_CACHE_ENTRIES", 8)
    policy = _policy({"groups": [1001], "operations": ["sign"], "key_ids": [KEY_A]})
    for uid in range(1000, 1050):
        caller = Caller(uid=uid, gid=1001 if uid % 2 else uid, pid=uid, groups=frozenset({uid}))
        for key_id in (KEY_A, KEY_B):
            allowed = policy.allows(caller, Operation.SIGN, _target(key_id=key_id))
            assert allowed is (uid % 2 == 1 and key_id == KEY_A)
    assert len(policy._callers) <= 8
    assert len(policy._decisions) <= 8
