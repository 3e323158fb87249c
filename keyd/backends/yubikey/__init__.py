"""YubiKey PIV backend (work in progress: the device layer)."""
