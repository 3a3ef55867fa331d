"""In-memory backends: the contract of the adapter interfaces, kept in dicts.

Guarantees:
- `MemoryInstanceController`, `MemoryStorageProvider` and `MemoryObjectStore` pass the same
  conformance suite (tests/conformance/) as the Docker, S3 and local-directory adapters:
  idempotence of every call, the errors each call raises, crash-safe archive and restore,
  ownership labels. A logic test (reconciler, API) may use them instead of the real ones
  for that reason only, and the real-service tests remain for the adapters themselves.
- They hold no state outside the objects: two instances never share anything, and
  nothing touches the network, a disk or a process.
"""

from .instances import MemoryInstance, MemoryInstanceController
from .objects import MemoryObjectStore
from .storage import MemoryStorageProvider, MemoryVolume

__all__ = [
    "MemoryInstance",
    "MemoryInstanceController",
    "MemoryObjectStore",
    "MemoryStorageProvider",
    "MemoryVolume",
]
