"""Object stores for COLD archives: S3/MinIO through aiobotocore, and a local directory
(s3.py, to be split)."""

from .s3 import MIN_PART_SIZE, LocalObjectStore, S3ObjectStore

__all__ = ["MIN_PART_SIZE", "LocalObjectStore", "S3ObjectStore"]
