"""YubiKey PIV backend (issue 4), in progress on branch yubikey-backend.

Done: device.py (the card by serial, exclusive PC/SC connection, serialised, found
again after reinsertion), piv.py (management key from the card's metadata or
PIN-protected, PIN never retried nor tried below a threshold, generation with
policies and a self-signed certificate, ECDSA/Ed25519 signing, touch timeout as a
clear error), attestation.py (chain to configured roots, Yubico's extensions).

To do: the Backend class and [yubikey.NAME] configuration (serial, reader,
pin_file / credential, management_key_file, slot, policies, min_pin_attempts,
attestation roots); Yubico's real roots and the 5.7.4+ intermediates as defaults;
PIN policy ONCE after each reselect; RSA-3072 (yubikit pads RSA by generating a
dummy RSA key per signature: pad PSS in keyd instead); adopt; re-arming a locked
PIN (an admin RPC); touch status to callers; udev rules; daemon-level tests on the
rig; benchmarks.
"""
