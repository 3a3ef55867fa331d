#!/usr/bin/env python3
"""Archive/restore benchmark: CodeHub's DockerVolumeStorage against `tar | pigz` on the same data.

Usage: .venv/bin/python bench/archive.py [--size-mb 1024] [--repeat 4] [--image IMAGE]
                                         [--level 1] [--restore-with tar|put-archive]
                                         [--docker-url URL] [--keep]

One run, side by side (the machine is shared: read the ratios, not the absolutes):
- data: a mixed tree of --size-mb MiB written straight into a fresh Docker volume's
  Mountpoint (so this must run as root on the Docker host): ~45% in large files, ~25% in
  medium files, ~30% in many small files (4-16 KiB); two thirds text-like (gzip ~3x), one
  third random (incompressible); owned by uid 1000 like a real home.
- archive, reference: `tar -c -C MOUNTPOINT . | pigz -1 > FILE`, then fsync(FILE).
- archive, CodeHub: `DockerVolumeStorage.archive()` into a LocalObjectStore on the same
  disk (Docker's archive API -> gzip in-process -> sha256 -> file, fsynced, .meta, verify).
- restore, reference: `pigz -d < FILE | tar -x -C DIR`, DIR the Mountpoint of a fresh
  Docker volume, so both sides create their files in the same part of the same file system.
- restore, CodeHub: `DockerVolumeStorage.restore()` into a new volume (stream + sha256 +
  inflate in-process -> GNU tar in a helper container over a local TCP connection, as the
  gateway's default `archive.restore_with = "tar"`; or -> Docker's put-archive).
Each pair runs --repeat times back to back, alternating which goes first, after a sync (so
no one's dirty pages are flushed inside a timing). Every restore goes into a tree of its own
(a new volume) and all of them are deleted only after the last timing: on ext4, creating
files right after tens of thousands were deleted is several times slower (the inode
allocator skips every recently deleted inode, `recently_deleted()` in fs/ext4/ialloc.c, for
one to six minutes), so whichever side ran after a deletion would be timed against the file
system rather than against the other side. Printed: MiB/s of each (of the uncompressed data)
and ratio = CodeHub throughput / reference throughput (>= 1: CodeHub is at least as fast),
from the best run of each side and as the median of the pairs. Goal: ratio >= 0.8. CPU
seconds: the reference pipeline's children (getrusage) or this process's, and "machine",
all the machine's busy CPU time during the run (so dockerd, its untar and a helper's tar
count too; on a machine with few cores that sum is what sets the pace).
Everything made (volumes, helper containers, the restore network, temp dirs) is removed at
the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiodocker
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools import ensure_tools

from codehub.backends.docker.network import BridgeNetwork
from codehub.backends.docker.volumes import DockerVolumeStorage
from codehub.backends.objects import LocalObjectStore
from codehub.config import DockerConfig

MiB = 1024 * 1024
WORDS = (b"def class return import self async await yield lambda None True False for in "
         b"while if else elif try except finally with as from raise pass break continue "
         b"the a of to and is that it on this be are was for you with not have but or "
         b"function const let var export default interface type string number boolean "
         b"README config build test src lib node_modules package json yaml toml").split()


def make_corpus(size: int, rng: random.Random) -> bytes:
    """Text-like bytes: words, identifiers and punctuation in lines; gzip -1 gets ~3x."""
    out = bytearray()
    while len(out) < size:
        line = b" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        out += b"    " * rng.randint(0, 3) + line + rng.choice([b"(x);", b":", b",", b""]) + b"\n"
        if rng.random() < 0.05:
            out += f"{rng.getrandbits(64):016x}".encode() + b"\n"
    return bytes(out[:size])


def generate_tree(root: Path, total: int, seed: int = 1) -> tuple[int, int]:
    """Write the mixed tree under root; return (files, bytes)."""
    rng = random.Random(seed)
    corpus = make_corpus(8 * MiB, rng)
    files = 0
    written = 0

    def content(n: int) -> bytes:
        if rng.random() < 1 / 3:
            return os.urandom(n)
        start = rng.randrange(0, len(corpus) - min(n, len(corpus) - 1))
        data = corpus[start:start + n]
        while len(data) < n:
            data += corpus[: n - len(data)]
        return data

    def write(path: Path, n: int) -> None:
        nonlocal files, written
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = n
            while left:
                step = min(left, 4 * MiB)
                f.write(content(step))
                left -= step
        files += 1
        written += n

    big, medium = int(total * 0.45), int(total * 0.25)
    i = 0
    while big > 0:
        n = min(big, rng.randint(32, 128) * MiB)
        write(root / "data" / f"big-{i}.bin", n)
        big -= n
        i += 1
    i = 0
    while medium > 0:
        n = min(medium, rng.randint(100 * 1024, 5 * MiB))
        write(root / "projects" / f"p{i % 20}" / f"asset-{i}.dat", n)
        medium -= n
        i += 1
    small = total - written
    i = 0
    while small > 0:
        n = min(small, rng.randint(4 * 1024, 16 * 1024))
        write(root / "node_modules" / f"pkg{i // 200}" / f"lib{i % 7}" / f"m{i}.js", n)
        small -= n
        i += 1
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), 1000, 1000)
    os.chown(root, 1000, 1000)
    return files, written


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_cpu() -> float:
    """CPU seconds the whole machine spent busy (all processes, the kernel's too): the one
    count that includes dockerd, its untar and the tar in a helper container alike."""
    t = psutil.cpu_times()  # not steal (another VM's) nor guest (already in user)
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def reference_archive(src: Path, out: Path, level: int) -> tuple[float, float, float]:
    os.sync()
    cpu, machine = children_cpu(), machine_cpu()
    began = time.perf_counter()
    with open(out, "wb") as f:
        subprocess.run(f"tar -c -C '{src}' . | pigz -{level}", shell=True, stdout=f,
                       check=True)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - began, children_cpu() - cpu, machine_cpu() - machine


def reference_restore(archive: Path, dest: Path) -> tuple[float, float, float]:
    os.sync()
    cpu, machine = children_cpu(), machine_cpu()
    began = time.perf_counter()
    subprocess.run(f"pigz -d < '{archive}' | tar -x -C '{dest}'", shell=True, check=True)
    return time.perf_counter() - began, children_cpu() - cpu, machine_cpu() - machine


async def pick_image(docker: aiodocker.Docker, wanted: str | None) -> str:
    """--image, else the gateway's default workspace image or a CodeHub-built one (they
    have the bash and tar the restore helper runs), else any local image."""
    if wanted:
        return wanted
    tags = [str(tag) for image in await docker.images.list()
            for tag in image.get("RepoTags") or [] if tag != "<none>:<none>"]
    for preferred in (DockerConfig().workspace_image, "codehub-code-server:latest",
                      "codehub-base:latest"):
        if preferred in tags:
            return preferred
    if tags:
        return tags[0]
    raise SystemExit("no local image to use for helper containers: pass --image")


class Timings:
    """Every run's wall time, and the CPU seconds of each measurement's best run."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, float] = {}
        self.machine_cpu: dict[str, float] = {}

    def add(self, name: str, seconds: float, cpu: float, machine: float) -> None:
        runs = self.times.setdefault(name, [])
        if not runs or seconds < min(runs):
            self.cpu[name] = cpu
            self.machine_cpu[name] = machine
        runs.append(seconds)

    def best(self, name: str) -> float:
        return min(self.times[name])

    def pair_ratios(self, ref: str, ours: str) -> list[float]:
        """Reference time / CodeHub time of each pair run back to back."""
        return [r / o for r, o in zip(self.times[ref], self.times[ours], strict=True)]


async def timed_ours(timings: Timings, name: str, coro: Any) -> Any:
    await asyncio.to_thread(os.sync)  # nobody's dirty pages get flushed inside a timing
    c0, m0, t0 = self_cpu(), machine_cpu(), time.perf_counter()
    result = await coro
    timings.add(name, time.perf_counter() - t0, self_cpu() - c0, machine_cpu() - m0)
    return result


async def volume_dir(docker: aiodocker.Docker, storage: DockerVolumeStorage, workspace_id: str,
                     made: list[tuple[str, str]]) -> tuple[str, Path]:
    """A new empty volume (removed at the end with the rest): its name and Mountpoint."""
    volume = await storage.provision(workspace_id)
    made.append((workspace_id, volume))
    info = await (await docker.volumes.get(volume)).show()
    return volume, Path(info["Mountpoint"])


async def measure(docker: aiodocker.Docker, storage: DockerVolumeStorage, volume: str,
                  mountpoint: Path, work: Path, args: argparse.Namespace,
                  made: list[tuple[str, str]]) -> tuple[Timings, dict[str, int]]:
    """Run each side --repeat times, alternating which goes first."""
    ref_file = work / "ref.tar.gz"
    timings = Timings()
    sizes: dict[str, int] = {}
    archived = None
    for rep in range(args.repeat):
        order = ["ref", "ours"] if rep % 2 == 0 else ["ours", "ref"]
        for who in order:
            if who == "ref":
                t, c, m = await asyncio.to_thread(reference_archive, mountpoint, ref_file,
                                                  args.level)
                sizes["ref"] = ref_file.stat().st_size
                timings.add("ref_a", t, c, m)
            else:
                archived = await timed_ours(timings, "ours_a", storage.archive("w1", volume))
                sizes["ours"] = archived.size
        assert archived is not None
        for who in order:
            if who == "ref":
                _, dest = await volume_dir(docker, storage, f"ref-{rep}", made)
                t, c, m = await asyncio.to_thread(reference_restore, ref_file, dest)
                timings.add("ref_r", t, c, m)
            else:
                # a workspace id per run: a new volume each time, none deleted until the end
                restored = await timed_ours(timings, "ours_r", storage.restore(
                    f"w1-r{rep}", archived.key, archived.sha256))
                made.append((f"w1-r{rep}", restored))
    return timings, sizes


async def run(args: argparse.Namespace) -> None:
    run_id = uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix=f"codehub-bench-archive-{run_id}-",
                                 dir=args.work_dir))
    docker = aiodocker.Docker(url=args.docker_url)
    objects = LocalObjectStore(work / "objects")
    await objects.open()
    image = await pick_image(docker, args.image)
    network = BridgeNetwork(docker, f"codehub-bench-{run_id}-restore") \
        if args.restore_with == "tar" else None
    storage = DockerVolumeStorage(docker=docker, objects=objects, helper_image=image,
                                  compression_level=args.level,
                                  volume_prefix=f"codehub-bench-{run_id}-",
                                  restore_network=network)
    made: list[tuple[str, str]] = []
    try:
        volume, mountpoint = await volume_dir(docker, storage, "w1", made)
        total = args.size_mb * MiB
        began = time.perf_counter()
        files, written = await asyncio.to_thread(generate_tree, mountpoint, total)
        print(f"data: {written / MiB:.0f} MiB in {files} files "
              f"(generated in {time.perf_counter() - began:.1f}s); helper image {image}; "
              f"gzip level {args.level}; restore with {args.restore_with}; "
              f"{os.cpu_count()} CPUs; best of {args.repeat}")

        timings, sizes = await measure(docker, storage, volume, mountpoint, work, args, made)
        mib = written / MiB
        print(f"archive size: reference {sizes['ref'] / MiB:.1f} MiB, "
              f"CodeHub {sizes['ours'] / MiB:.1f} MiB")
        for name, ref_name, ref, ours in (("archive", "tar | pigz -1 > file", "ref_a", "ours_a"),
                                          ("restore", "pigz -d | tar -x", "ref_r", "ours_r")):
            ref_t, ours_t = timings.best(ref), timings.best(ours)
            pairs = timings.pair_ratios(ref, ours)
            print(f"{name}: reference ({ref_name}) {mib / ref_t:7.1f} MiB/s "
                  f"[{ref_t:.2f}s, cpu {timings.cpu[ref]:.1f}s, machine "
                  f"{timings.machine_cpu[ref]:.1f}s] | CodeHub "
                  f"{mib / ours_t:7.1f} MiB/s [{ours_t:.2f}s, cpu {timings.cpu[ours]:.1f}s, "
                  f"machine {timings.machine_cpu[ours]:.1f}s] | "
                  f"ratio {ref_t / ours_t:.2f} (best of each), "
                  f"{statistics.median(pairs):.2f} (median of pairs: "
                  f"{' '.join(f'{r:.2f}' for r in pairs)})")
    finally:
        if not args.keep:
            for workspace_id, name in reversed(made):
                await storage.delete_volume(workspace_id, name)
            await objects.delete(DockerVolumeStorage.archive_key("w1"))
            if network is not None:
                with contextlib.suppress(aiodocker.DockerError):
                    await (await docker.networks.get(network.name)).delete()
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: volumes {[name for _, name in made]}, work dir {work}")
        await objects.close()
        await docker.close()


def main() -> None:
    ensure_tools({"pigz": "pigz", "tar": "tar"})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="MiB of data (default 1024)")
    parser.add_argument("--repeat", type=int, default=4,
                        help="runs of each side, half of them going first (default 4)")
    parser.add_argument("--image", default=None,
                        help="image for the helper containers (default: any local image)")
    parser.add_argument("--level", type=int, default=1, help="gzip level (default 1)")
    parser.add_argument("--restore-with", choices=("tar", "put-archive"), default="tar",
                        help="archive.restore_with (default tar, as the gateway's default)")
    parser.add_argument("--docker-url", default=None, help="Docker API URL")
    parser.add_argument("--work-dir", default=None,
                        help="where the reference archive and restore go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep what was made")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
