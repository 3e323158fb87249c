"""An emulated YubiKey PIV card and the tests that drive it through yubikit's PivSession."""
