"""How a restore's verified tar reaches a new volume: the contract of a restore transport.

Two transports keep it: Docker's put-archive through a created, never started helper
(codehub.backends.docker.restore_put) and GNU tar in a helper on a restore network fed over a
one-time connection (codehub.backends.docker.restore_tar).

Guarantees:
- `RestoreTransport.extract(job)` returns the name of the helper it used (the caller
  removes it) only once the extractor reported success and `job.tar` was read to its
  verified end; otherwise it raises, and the stream's own failure (a checksum mismatch, a
  store error, a refused member) wins over the extractor's account of it.
- It writes into `job.volume` only, as files of `job.workspace_id`, and only what
  `job.tar` yields (codehub.storage.codec: its last bytes only once verified).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ...storage.codec import VerifiedTar


@dataclass(frozen=True, slots=True)
class RestoreJob:
    """One restore: the archive's verified tar, into a new volume of one workspace."""

    workspace_id: str
    volume: str
    tar: VerifiedTar

    @property
    def key(self) -> str:
        return self.tar.expected.key


class RestoreTransport(ABC):
    @abstractmethod
    async def extract(self, job: RestoreJob) -> str:
        """Fill `job.volume` from `job.tar`; the helper's name. See the module's doc."""
