"""PKCS#11 tokens and HSMs through python-pkcs11 (SoftHSM2 in the tests).

module.py loads a vendor module for multi-threaded use; token.py finds one token,
logs in once and pools sessions; keys.py maps keyd's key types to PKCS#11
templates and mechanisms; backend.py is the Backend the daemon talks to.
"""

from keyd.backends.pkcs11.backend import FAMILY, Pkcs11Backend, backend_name

__all__ = ["FAMILY", "Pkcs11Backend", "backend_name"]
