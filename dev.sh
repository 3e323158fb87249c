#!/usr/bin/env bash
# keyd's one entry point for people and CI.
#
#   ./dev.sh demo    set up, start a throwaway keyd (no hardware), create a key, sign,
#                    verify with openssl; leaves the daemon running and prints its socket
#   ./dev.sh test    set up (system packages too), then ruff, mypy and the whole test suite
#   ./dev.sh bench   run the benchmarks (results: docs/performance.md)
#   ./dev.sh proto   regenerate keyd/v1 from proto/
#
# Set-up installs Debian packages when run as root (or with sudo), creates .venv and
# installs keyd with its test extras into it. Set KEYD_VENV to use another venv path.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${KEYD_VENV:-.venv}
PY="$VENV/bin/python"

# pyscard (pulled in by yubikey-manager) has no Linux wheel: it builds with swig, gcc and the
# PC/SC headers. openssl verifies the demo's signature; systemd gives systemd-analyze to tests.
# pcscd and iproute2 run the emulated-YubiKey rig (tests/piv/rig.py) in private namespaces.
DEB_PACKAGES=(python3 python3-venv python3-dev gcc swig libpcsclite-dev openssl systemd softhsm2 opensc notary pcscd iproute2)
# vpcd, the virtual reader driver the rig needs, is unpacked into .cache/vpcd, not installed:
# the package would also configure the machine's own pcscd to listen on TCP 35963.
VPCD_DIR=.cache/vpcd

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

system_packages() {
    command -v dpkg-query >/dev/null || { log "not a Debian system: install ${DEB_PACKAGES[*]} yourself"; return; }
    local missing=()
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"
        else
            echo "keyd needs these Debian packages: ${missing[*]}" >&2
            echo "install them (sudo apt-get install ${missing[*]}) and run this again" >&2
            exit 1
        fi
    fi
    log "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_env() {
    local py
    py=$(command -v python3) || { echo "python3 not found" >&2; exit 1; }
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "keyd needs Python 3.11 or newer ($py is older)" >&2; exit 1; }
    [ -x "$PY" ] || { log "creating $VENV"; "$py" -m venv "$VENV"; }
    local stamp="$VENV/.keyd-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing keyd and its test dependencies into $VENV"
        "$PY" -m pip install -q --upgrade pip >/dev/null
        "$PY" -m pip install -q -e '.[test]'
        touch "$stamp"
    fi
}

vpcd_driver() {
    [ -f "$VPCD_DIR/usr/lib/pcsc/drivers/serial/libifdvpcd.so" ] && return
    command -v apt-get >/dev/null || { log "no apt-get: the emulated-YubiKey rig tests will skip"; return; }
    log "unpacking vsmartcard-vpcd into $VPCD_DIR (not installed system-wide)"
    mkdir -p "$VPCD_DIR"
    (cd "$VPCD_DIR" && apt-get download -qq vsmartcard-vpcd >/dev/null 2>&1 && dpkg-deb -x vsmartcard-vpcd_*.deb . && rm vsmartcard-vpcd_*.deb) \
        || log "could not fetch vsmartcard-vpcd: the emulated-YubiKey rig tests will skip"
}

setup() { system_packages; vpcd_driver; python_env; }

cmd_test() {
    setup
    log "ruff"
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    log "mypy"
    "$VENV/bin/mypy"
    log "pytest"
    # pytest exits 5 when it collects nothing: a vanished suite fails here too.
    "$PY" -m pytest "$@"
}

cmd_demo() {
    setup
    local dir keyd key
    dir=$(mktemp -d /tmp/keyd-demo-XXXXXX)
    chmod 700 "$dir"
    keyd="$VENV/bin/keyd"
    cat >"$dir/keyd.toml" <<TOML
# Throwaway demo configuration: everything lives in $dir
[server]
socket = "$dir/run/keyd.sock"
[store]
path = "$dir/state/keyd.db"
secret_file = "$dir/secret/store.key"
[access]
policy = "$dir/policy.toml"  # written by keyd init: you may do everything
TOML
    log "creating an encrypted store in $dir"
    "$keyd" init --config "$dir/keyd.toml"
    log "starting keyd"
    nohup "$keyd" serve --config "$dir/keyd.toml" >"$dir/keyd.log" 2>&1 &
    echo $! >"$dir/keyd.pid"
    export KEYD_SOCKET="$dir/run/keyd.sock"
    for _ in $(seq 100); do "$keyd" status >/dev/null 2>&1 && break; sleep 0.1; done
    "$keyd" status
    log "creating an ECDSA P-256 timestamp key"
    key=$("$keyd" keys create --type ecdsa-p256 --role timestamp --collection example.com/demo)
    "$keyd" keys show "$key"
    log "signing a message and verifying the signature with openssl"
    echo "hello from keyd" >"$dir/message.txt"
    "$keyd" sign "$key" --input "$dir/message.txt" --output "$dir/message.sig"
    "$keyd" keys show "$key" --pem >"$dir/key.pem"
    openssl dgst -sha256 -verify "$dir/key.pem" -signature "$dir/message.sig" "$dir/message.txt"
    cat <<MSG

keyd is running (pid $(cat "$dir/keyd.pid"), log $dir/keyd.log) on:
  $KEYD_SOCKET
Try:  export KEYD_SOCKET=$KEYD_SOCKET PATH=$PWD/$VENV/bin:\$PATH
      keyd keys list; echo data | keyd sign $key
Stop: kill $(cat "$dir/keyd.pid")     (then rm -r $dir)
MSG
}

cmd_bench() { setup; "$PY" -m benchmarks "$@"; }
cmd_proto() { setup; "$PY" tools/gen_proto.py; }

case "${1:-}" in
    demo) shift; cmd_demo "$@" ;;
    test) shift; cmd_test "$@" ;;
    bench) shift; cmd_bench "$@" ;;
    proto) shift; cmd_proto "$@" ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
