"""YubiKey PIV backend: device.py reaches the card, piv.py speaks PIV, attestation.py
checks what the card vouches for, backend.py is the Backend keyd uses."""
