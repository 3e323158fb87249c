"""keyd: a hardware-backed key-management daemon for TUF and Notary signing."""

__version__ = "0.1.0"
