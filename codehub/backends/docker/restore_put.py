"""Restore through Docker's put-archive: the transport that needs no network.

Guarantees:
- The verified tar is streamed (chunked) into Docker's archive API on a created, never
  started helper that mounts the new volume; Docker extracts it as root with owners,
  modes and nodes as written, which is why only what codehub.storage.tarfilter let
  through reaches it.
- It keeps codehub.backends.docker.transport's contract: success only for a tar read to its
  verified end that Docker accepted; the stream's own failure is the one raised.
"""

from __future__ import annotations

import contextlib

import aiodocker

from ...interfaces import AdapterError
from .engine import docker_errors
from .helpers import MOUNT_PARENT, STREAM_TIMEOUT, Helpers
from .transport import RestoreJob, RestoreTransport


class PutArchive(RestoreTransport):
    def __init__(self, docker: aiodocker.Docker, helpers: Helpers) -> None:
        self._docker = docker
        self._helpers = helpers

    async def extract(self, job: RestoreJob) -> str:
        helper = await self._helpers.create(job.volume, job.workspace_id, "restorer",
                                            read_only=False)
        try:
            async with contextlib.aclosing(job.tar.pieces()) as body:
                with docker_errors(f"extracting {job.key} through {helper}"):
                    async with self._docker._query(
                        f"containers/{helper}/archive", "PUT", params={"path": MOUNT_PARENT},
                        data=body, headers={"Content-Type": "application/x-tar"},
                        timeout=STREAM_TIMEOUT, chunked=True,
                    ) as resp:
                        with contextlib.closing(resp):
                            await resp.read()
        except AdapterError:
            # The body's own failure (a checksum mismatch, a store error) is the real cause.
            if (failure := job.tar.failure()) is not None:
                raise failure from None
            raise
        job.tar.check(f"Docker finished extracting {job.key} before it was fully streamed")
        return helper
