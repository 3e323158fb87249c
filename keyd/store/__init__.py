"""The encrypted SQLCipher store: the key catalog and the private keys of online keys."""

from keyd.store.catalog import Catalog
from keyd.store.database import Database
from keyd.store.secret import StoreSecret, create_secret_file, load_store_secret

__all__ = ["Catalog", "Database", "StoreSecret", "create_secret_file", "load_store_secret"]
