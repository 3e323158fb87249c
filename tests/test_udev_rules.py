"""Checks of the udev rules in udev/, pcscd's polkit rule for keyd and the PKCS#11 drop-in.

The rules files (70-keyd-hsm.rules, 70-keyd-yubikey.rules) are parsed here: `udevadm verify`
only exists from systemd 254 on (Debian 12 has 252), and runs where it is installed. The polkit
rule (50-keyd-pcscd.rules) is checked as text, and run with a stand-in `polkit` object where
node is installed. The drop-in systemd/keyd-pkcs11.conf is checked with systemd-analyze
together with the unit, as shipped and with every commented example directive enabled.
"""

from __future__ import annotations

import json
import plistlib
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyd.config import Pkcs11TokenConfig
from tests.systemd_tools import (
    MAX_EXPOSURE,
    UNIT,
    directives,
    exposure,
    run,
    verifiable_copy,
    verify_problems,
)

ROOT = Path(__file__).resolve().parent.parent
HSM_RULES = ROOT / "udev" / "70-keyd-hsm.rules"
YUBIKEY_RULES = ROOT / "udev" / "70-keyd-yubikey.rules"
RULES_FILES = (HSM_RULES, YUBIKEY_RULES)
POLKIT_RULES = ROOT / "udev" / "50-keyd-pcscd.rules"
UDEV_README = ROOT / "udev" / "README.md"
DROPIN = ROOT / "systemd" / "keyd-pkcs11.conf"
SYSTEMD_README = ROOT / "systemd" / "README.md"

# The keys a rule in this file may match on, and the only ones it may set: no OWNER, TAG
# ("uaccess" is for logged-in users), RUN, PROGRAM or IMPORT.
MATCH_KEYS = frozenset(
    {
        "ACTION",
        "SUBSYSTEM",
        "KERNEL",
        "ENV{DEVTYPE}",
        "ATTR{idVendor}",
        "ATTR{idProduct}",
        "ATTRS{idVendor}",
        "ATTRS{idProduct}",
    }
)
ASSIGN_KEYS = frozenset({"GROUP", "MODE"})
VENDOR_KEYS = ("ATTR{idVendor}", "ATTRS{idVendor}")
PRODUCT_KEYS = ("ATTR{idProduct}", "ATTRS{idProduct}")
USB_ID = re.compile(r"[0-9a-f]{4}")
YUBICO = "1050"
# Every YubiKey USB configuration that includes CCID: NEO, then YubiKey 4 and 5.
YUBIKEY_CCID = ("0111", "0112", "0115", "0116", "0404", "0405", "0406", "0407")
# libccid's list of supported readers: every YubiKey configuration with CCID is in it (Debian 12:
# libccid 1.5.2, a dependency of pcscd).
LIBCCID_PLIST = Path("/usr/lib/pcsc/drivers/ifd-ccid.bundle/Contents/Info.plist")

# The two actions pcscd asks polkit about (pcsc-lite's src/winscard_svc.c), and the policy that
# declares them. Debian 12's pcscd is built without polkit and ships no policy file.
PCSC_ACTIONS = frozenset({"org.debian.pcsc-lite.access_pcsc", "org.debian.pcsc-lite.access_card"})
PCSC_POLICY = Path("/usr/share/polkit-1/actions/org.debian.pcsc-lite.policy")

# KEY{attr} OP "value", then a comma or the end of the line.
_PAIR = re.compile(
    r'(?P<key>[A-Z]+(?:\{[A-Za-z0-9_]+\})?)\s*(?P<op>==|!=|\+=|-=|:=|=)\s*"(?P<value>[^"]*)"'
    r"\s*(?:,\s*|$)"
)


@dataclass(frozen=True)
class Rule:
    lineno: int
    pairs: tuple[tuple[str, str, str], ...]  # (key, operator, value), in order
    comment: str  # the comment block right above the rule

    def get(self, key: str, op: str) -> str | None:
        values = [v for k, o, v in self.pairs if k == key and o == op]
        return values[0] if values else None

    def get_any(self, keys: tuple[str, ...], op: str) -> str | None:
        for key in keys:
            value = self.get(key, op)
            if value is not None:
                return value
        return None


def parse_rule(line: str, lineno: int = 0, comment: str = "") -> Rule:
    """Split one rule line into its KEY OP "value" pairs; ValueError if anything is left over."""
    text = line.strip()
    if text.endswith((",", "\\")):
        raise ValueError(f"line {lineno}: trailing comma or line continuation: {line!r}")
    pairs: list[tuple[str, str, str]] = []
    pos = 0
    while pos < len(text):
        match = _PAIR.match(text, pos)
        if match is None:
            raise ValueError(f'line {lineno}: not a KEY=="value" list at {text[pos:]!r}')
        pairs.append((match["key"], match["op"], match["value"]))
        pos = match.end()
    if not pairs:
        raise ValueError(f"line {lineno}: empty rule")
    return Rule(lineno, tuple(pairs), comment)


def parse_rules(path: Path) -> list[Rule]:
    rules: list[Rule] = []
    comment: list[str] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line:
            comment = []
        elif line.startswith("#"):
            comment.append(line)
        else:
            rules.append(parse_rule(line, lineno, "\n".join(comment)))
            comment = []
    return rules


def _key_problems(rule: Rule) -> list[str]:
    """Keys, operators and ID syntax."""
    problems: list[str] = []
    seen: set[str] = set()
    for key, op, value in rule.pairs:
        if key in MATCH_KEYS:
            if op not in ("==", "!="):
                problems.append(f"{key}{op}: a match key needs == or !=")
        elif key in ASSIGN_KEYS:
            if op != "=":
                problems.append(f"{key}{op}: set {key} with =")
        else:
            problems.append(f"{key}: not a key this file may use")
        if key in seen:
            problems.append(f"{key} appears twice")
        seen.add(key)
        if key in VENDOR_KEYS + PRODUCT_KEYS and not all(
            USB_ID.fullmatch(one) for one in value.split("|")
        ):
            problems.append(f"{key}=={value!r}: IDs are 4 lowercase hex digits")
    return problems


def _match_problems(rule: Rule) -> list[str]:
    """What the rule applies to: one kind of device node, on every event but remove."""
    problems: list[str] = []
    if rule.get_any(VENDOR_KEYS, "==") is None or rule.get_any(PRODUCT_KEYS, "==") is None:
        # Without both IDs the rule would hand group keyd a whole class of devices.
        problems.append("matches no specific idVendor and idProduct")
    subsystem = rule.get("SUBSYSTEM", "==")
    usb_device = subsystem == "usb" and rule.get("ENV{DEVTYPE}", "==") == "usb_device"
    if not (usb_device or subsystem == "hidraw"):
        problems.append('match SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device" (or a hidraw node)')
    action = [(op, value) for key, op, value in rule.pairs if key == "ACTION"]
    if action not in ([], [("!=", "remove")]):
        problems.append('ACTION: use ACTION!="remove" (or none); "change"/"bind" must keep access')
    return problems


def _grant_problems(rule: Rule) -> list[str]:
    """What the rule grants: group keyd, 0660, nobody else."""
    problems: list[str] = []
    if rule.get("GROUP", "=") != "keyd":
        problems.append('does not set GROUP="keyd"')
    mode = rule.get("MODE", "=")
    if mode != "0660":
        problems.append(f'sets MODE={mode!r}, not "0660"')
    if mode is not None and re.fullmatch(r"[0-7]{3,4}", mode):
        bits = int(mode, 8)
        if bits & 0o007:
            problems.append(f"MODE={mode} gives everyone access")
        if bits & 0o7000:
            problems.append(f"MODE={mode} sets setuid/setgid/sticky bits")
    return problems


def _source_problems(rule: Rule) -> list[str]:
    """The comment above the rule names its source and every product ID it matches."""
    problems: list[str] = []
    if "source" not in rule.comment.lower():
        problems.append("no comment above the rule naming the source of its IDs")
    for product in (rule.get_any(PRODUCT_KEYS, "==") or "").split("|"):
        cited = re.search(rf"\b(?:0x)?{re.escape(product)}\b", rule.comment, re.IGNORECASE)
        if product and cited is None:
            problems.append(f"product ID {product} is not named in the comment above the rule")
    return problems


def rule_problems(rule: Rule) -> list[str]:
    """Everything wrong with a rule for these files; an empty list for a good one."""
    return (
        _key_problems(rule) + _match_problems(rule) + _grant_problems(rule) + _source_problems(rule)
    )


def _ids(rule: Rule) -> list[str]:
    vendor = rule.get_any(VENDOR_KEYS, "==") or ""
    products = (rule.get_any(PRODUCT_KEYS, "==") or "").split("|")
    return [f"{vendor}:{product}" for product in products]


GOOD = (
    'ACTION!="remove", SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device", ATTR{idVendor}=="1050", '
    'ATTR{idProduct}=="0030", GROUP="keyd", MODE="0660"'
)


_EACH_FILE = pytest.mark.parametrize("rules_file", RULES_FILES, ids=lambda path: path.name)


@_EACH_FILE
def test_rules_file_has_rules_and_all_parse(rules_file: Path) -> None:
    rules = parse_rules(rules_file)
    assert rules, f"{rules_file} has no rules"
    for rule in rules:
        assert rule.pairs, rule


@_EACH_FILE
def test_every_rule_grants_group_keyd_only(rules_file: Path) -> None:
    problems = {
        f"line {rule.lineno}": found
        for rule in parse_rules(rules_file)
        if (found := rule_problems(rule))
    }
    assert problems == {}


@_EACH_FILE
def test_no_rule_grants_world_access(rules_file: Path) -> None:
    for rule in parse_rules(rules_file):
        mode = rule.get("MODE", "=")
        assert mode is not None, f"line {rule.lineno} sets no MODE"
        assert int(mode, 8) & 0o007 == 0, f"line {rule.lineno}: MODE={mode}"
        assert all(key not in ("OWNER", "TAG") for key, _, _ in rule.pairs), rule


def test_each_device_has_one_rule_and_is_in_the_readme() -> None:
    ids = [one for path in RULES_FILES for rule in parse_rules(path) for one in _ids(rule)]
    assert len(ids) == len(set(ids)), f"a device matched twice: {ids}"
    readme = UDEV_README.read_text(encoding="utf-8")
    for one in ids:
        assert f"`{one}`" in readme, f"{one} is not in the table of {UDEV_README}"
    for path in (*RULES_FILES, POLKIT_RULES):
        assert f"`{path.name}`" in readme, f"{UDEV_README} does not describe {path.name}"


def _yubikey_products() -> list[str]:
    return [one.split(":")[1] for rule in parse_rules(YUBIKEY_RULES) for one in _ids(rule)]


def test_yubikey_rules_are_for_yubico_devices_only() -> None:
    for rule in parse_rules(YUBIKEY_RULES):
        assert rule.get_any(VENDOR_KEYS, "==") == YUBICO, f"line {rule.lineno}: not vendor 1050"
    assert sorted(_yubikey_products()) == sorted(YUBIKEY_CCID)


def test_yubikey_rules_match_libccids_yubikeys() -> None:
    """Every configuration with CCID that libccid (so pcscd) drives, and nothing else."""
    if not LIBCCID_PLIST.exists():
        pytest.skip(f"libccid is not installed ({LIBCCID_PLIST} missing)")
    readers = plistlib.loads(LIBCCID_PLIST.read_bytes())
    listed = {
        product.lower().removeprefix("0x").zfill(4)
        for vendor, product in zip(readers["ifdVendorID"], readers["ifdProductID"], strict=True)
        if vendor.lower() == f"0x{YUBICO}"
    }
    assert listed == set(_yubikey_products()), f"libccid lists Yubico {sorted(listed)}"


def test_good_rule_passes_the_checks() -> None:
    assert rule_problems(parse_rule(GOOD, comment="# Source: vendor, PID 0x0030")) == []


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (GOOD.replace('MODE="0660"', 'MODE="0666"'), "everyone"),
        (GOOD.replace('GROUP="keyd"', 'GROUP="plugdev"'), 'GROUP="keyd"'),
        (GOOD.replace('"0030"', '"0A30"'), "lowercase hex"),
        (GOOD.replace('"1050"', '"105"'), "lowercase hex"),
        (GOOD.replace('"1050"', '"10*"'), "lowercase hex"),
        (GOOD.replace(', ATTR{idProduct}=="0030"', ""), "specific idVendor and idProduct"),
        (GOOD + ', TAG+="uaccess"', "TAG"),
        (GOOD + ', RUN+="/bin/true"', "RUN"),
        (GOOD.replace('ACTION!="remove"', 'ACTION=="add"'), "ACTION"),
        (GOOD.replace('GROUP="keyd"', 'GROUP=="keyd"'), "set GROUP with ="),
        (GOOD.replace('ENV{DEVTYPE}=="usb_device", ', ""), "usb_device"),
    ],
)
def test_bad_rules_are_caught(bad: str, expected: str) -> None:
    problems = rule_problems(parse_rule(bad, comment="# Source: vendor"))
    assert any(expected in problem for problem in problems), problems


def test_rule_without_source_is_caught() -> None:
    assert any("source" in p for p in rule_problems(parse_rule(GOOD, comment="# YubiHSM 2 0030")))


@pytest.mark.parametrize(
    ("line", "comment"),
    [
        (GOOD, "# Source: vendor"),
        (GOOD, "# Source: vendor, PID 00300"),  # 0030 only inside a longer number
        (GOOD.replace('"0030"', '"0030|0031"'), "# Source: vendor, 0030"),
    ],
)
def test_product_id_missing_from_the_comment_is_caught(line: str, comment: str) -> None:
    problems = rule_problems(parse_rule(line, comment=comment))
    assert any("is not named in the comment" in problem for problem in problems), problems


@pytest.mark.parametrize(
    "bad",
    [
        'SUBSYSTEM=="usb" GROUP="keyd"',  # no comma
        'SUBSYSTEM=="usb", GROUP=keyd',  # unquoted
        'SUBSYSTEM=="usb",',  # trailing comma
        "garbage",
    ],
)
def test_malformed_lines_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="line"):
        parse_rule(bad)


@_EACH_FILE
def test_udevadm_verify_accepts_the_rules(rules_file: Path) -> None:
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        pytest.skip("udevadm is not installed")
    if run([udevadm, "verify", "--help"]).returncode != 0:
        pytest.skip("udevadm has no verify command (it needs systemd 254 or later)")
    # Group keyd need not exist on the machine that runs the tests.
    proc = run([udevadm, "verify", "--resolve-names=never", str(rules_file)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- pcscd's polkit rule -----------------------------------------------------------------------


def _js_code(text: str) -> str:
    """The rule's code without its comments (none of its strings holds // or /*)."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.DOTALL)


def test_polkit_rule_names_user_keyd_and_the_two_pcscd_actions() -> None:
    code = _js_code(POLKIT_RULES.read_text(encoding="utf-8"))
    strings = re.findall(r'"([^"\\]*)"', code)
    assert {s for s in strings if s.startswith("org.")} == PCSC_ACTIONS, strings
    assert [s for s in strings if not s.startswith("org.")] == ["keyd"], strings
    assert re.search(r"\bsubject\.user\s*===?\s*\"keyd\"", code), code
    assert code.count("polkit.addRule(") == 1, code
    assert "polkit.Result.YES" in code
    assert "polkit.Result.NO;" not in code  # allows keyd, never denies anyone
    # polkit 122 (Debian 12) runs rules in duktape: ES5, so no arrow functions, let, const or
    # template strings.
    assert not re.search(r"=>|\blet\b|\bconst\b|`", code), code


# Runs the rule file in a fresh context whose only global is a stand-in for polkit's object, then
# asks it about each (user, action) pair, as polkitd does for a process without a session.
_NODE_PROBE = """
const fs = require("fs");
const vm = require("vm");
const [path, cases] = [process.argv[1], JSON.parse(process.argv[2])];  // node -e: no script
const rules = [];
const Result = { NO: "NO", YES: "YES", AUTH_SELF: "AUTH_SELF", AUTH_SELF_KEEP: "AUTH_SELF_KEEP",
                 AUTH_ADMIN: "AUTH_ADMIN", AUTH_ADMIN_KEEP: "AUTH_ADMIN_KEEP",
                 NOT_HANDLED: null };
const polkit = { Result, addRule: (rule) => rules.push(rule), addAdminRule: () => {},
                 log: () => {}, spawn: () => { throw new Error("spawn"); } };
vm.runInNewContext(fs.readFileSync(path, "utf8"), { polkit }, { filename: path });
const answers = cases.map(([user, id]) => {
  const action = { id, lookup: (key) => (key === "reader" ? "Yubico YubiKey CCID 00 00" : "") };
  const subject = { user, pid: 4242, groups: [user], seat: "", session: "", local: false,
                    active: false, isInGroup: () => false,
                    isInNetGroup: () => false };
  for (const rule of rules) {
    const result = rule(action, subject);
    if (result !== null && result !== undefined) return result;
  }
  return "NOT_HANDLED";
});
console.log(JSON.stringify({ rules: rules.length, answers }));
"""


def test_polkit_rule_allows_keyd_the_two_actions_and_nothing_else() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the polkit rule is checked as text only")
    actions = [*sorted(PCSC_ACTIONS), "org.freedesktop.login1.reboot", "org.debian.pcsc-lite.x"]
    users = ["keyd", "root", "keyd-notary", "nobody", "keydx"]
    cases = [(user, action) for user in users for action in actions]
    proc = run([node, "-e", _NODE_PROBE, str(POLKIT_RULES), json.dumps(cases)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["rules"] == 1
    got = dict(zip(cases, result["answers"], strict=True))
    expected = {
        case: "YES" if case[0] == "keyd" and case[1] in PCSC_ACTIONS else "NOT_HANDLED"
        for case in cases
    }
    assert got == expected


def test_polkit_actions_exist_in_pcscds_policy() -> None:
    if not PCSC_POLICY.exists():
        pytest.skip(
            f"{PCSC_POLICY} is not installed: this pcscd does not use polkit (Debian 12's pcscd "
            "1.9.9 is built without it); the action IDs are those of pcsc-lite's "
            "doc/org.debian.pcsc-lite.policy"
        )
    policy = ET.parse(PCSC_POLICY)  # noqa: S314 - a package's file under /usr, not input
    declared = {action.get("id", "") for action in policy.getroot().iter("action")}
    assert declared >= PCSC_ACTIONS, f"{PCSC_POLICY} declares {sorted(declared)}"


def _unit_with_dropin(directory: Path, dropin_text: str) -> Path:
    unit = verifiable_copy(UNIT, directory)
    dropin_dir = directory / f"{UNIT.name}.d"
    dropin_dir.mkdir()
    (dropin_dir / DROPIN.name).write_text(dropin_text, encoding="utf-8")
    return unit


def _enable_examples(text: str) -> tuple[str, int]:
    """Uncomment every example directive ("#Key=value"); prose comments have "# "."""
    return re.subn(r"^#(?=[A-Z][A-Za-z]*=)", "", text, flags=re.MULTILINE)


def test_dropin_verifies_as_shipped(tmp_path: Path) -> None:
    unit = _unit_with_dropin(tmp_path, DROPIN.read_text(encoding="utf-8"))
    returncode, problems, output = verify_problems(unit)
    assert returncode == 0, output
    assert problems == [], output


def test_dropin_verifies_with_every_example_enabled(tmp_path: Path) -> None:
    text, enabled = _enable_examples(DROPIN.read_text(encoding="utf-8"))
    assert enabled >= 8, f"only {enabled} example directives found in {DROPIN}"
    returncode, problems, output = verify_problems(_unit_with_dropin(tmp_path, text))
    assert returncode == 0, output
    assert problems == [], output


def test_dropin_is_really_read_by_verify(tmp_path: Path) -> None:
    """A broken drop-in must show up, or the two tests above prove nothing."""
    text = DROPIN.read_text(encoding="utf-8") + "NoSuchDirective=yes\n"
    _, problems, output = verify_problems(_unit_with_dropin(tmp_path, text))
    assert any("NoSuchDirective" in line for line in problems), output


def test_dropin_opens_usb_only_and_keeps_examples_for_the_rest() -> None:
    active = directives(DROPIN)
    assert active[("Service", "PrivateDevices")] == ["no"]
    assert active[("Service", "DeviceAllow")] == ["char-usb_device rw"]
    assert active[("Service", "RestrictAddressFamilies")] == ["AF_NETLINK"]
    assert ("Service", "PrivateNetwork") not in active
    assert ("Service", "DevicePolicy") not in active  # the unit's closed policy stays
    assert ("Service", "LoadCredential") not in active  # needs the table's name first

    text = DROPIN.read_text(encoding="utf-8")
    credential = Pkcs11TokenConfig(module=Path("/unused")).pin_credential("NAME")
    for example in (
        f"#LoadCredential={credential}:/etc/keyd/NAME.pin",
        "#PrivateNetwork=no",
        "#RestrictAddressFamilies=AF_INET AF_INET6",
        "#IPAddressAllow=",
        "#DeviceAllow=char-hidraw rw",
        "#MemoryDenyWriteExecute=no",
        "#Wants=pcscd.socket",
    ):
        assert f"\n{example}" in text, f"{example!r} missing from {DROPIN}"
    assert DROPIN.name in SYSTEMD_README.read_text(encoding="utf-8")


def test_exposure_with_usb_dropin_stays_low(tmp_path: Path) -> None:
    unit = _unit_with_dropin(tmp_path, DROPIN.read_text(encoding="utf-8"))
    level, output = exposure(unit)
    assert level <= MAX_EXPOSURE, output
    # The drop-in must have been applied, or this measured the bare unit.
    assert "char-usb_device" in output, output
