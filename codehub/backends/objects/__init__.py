"""Object stores for COLD archives: S3/MinIO through aiobotocore (s3.py), and a local
directory (local.py); the `.meta` sidecar both write is meta.py's.

Guarantees (every store here):
- A `.meta` sidecar ({size, sha256, created_at, format}) exists only next to a complete
  object it describes: `put_stream` deletes the old sidecar before writing anything and
  writes the new one last, so a crash at any point leaves either no sidecar or a true one.
- `head()` returns the sidecar only when the stored object's size equals it; a present
  sidecar whose object has another size raises `IntegrityError` (nothing is deleted).
- A failed or crashed `put_stream` leaves no object that looks complete (each module says
  how).
- `delete()` of what is missing is a no-op; a key codehub.backends.rules refuses is refused
  (PermanentError) by every call that takes one.
- Lifetime (codehub.interfaces.Adapter): `async with store:` opens it (S3: the client, and
  the bucket made when missing; local: the root directory) and leaving closes it.
"""

from .local import LocalObjectStore
from .s3 import MIN_PART_SIZE, S3ObjectStore

__all__ = ["MIN_PART_SIZE", "LocalObjectStore", "S3ObjectStore"]
