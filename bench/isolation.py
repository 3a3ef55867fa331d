#!/usr/bin/env python3
"""What the isolation firewall costs on the hot path: the gateway's hop to a workspace.

Usage: .venv/bin/python bench/isolation.py [--duration 5] [--rounds 3] [--networks 12]

Two workspaces of the echo test image (tests/images/echo, built if missing) on two bridge
networks made by CodeHub's own code (codehub.backends.docker.network): one without the firewall,
one with it, alongside `--networks - 1` more firewalled networks so that every packet
crosses the jumps of a 10,000-workspace deployment. wrk, on the host as the gateway is,
measures requests per second at 16 connections and latency at 1 connection against each,
interleaved over rounds (medians). The machine is shared: read the ratio, not the figures.
Root on the Docker host; everything made is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import aiodocker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools import ensure_tools  # noqa: E402

from codehub.backends.docker.containers import DockerInstanceController  # noqa: E402
from codehub.backends.docker.firewall import Firewall  # noqa: E402
from codehub.backends.docker.network import BridgeNetwork  # noqa: E402
from codehub.backends.docker.sandbox import Sandbox  # noqa: E402


def wrk(url: str, connections: int, duration: int) -> tuple[float, float]:
    """(requests per second, p50 latency in microseconds)."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    assert p50 is not None, out
    scale = {"us": 1, "ms": 1000, "s": 1_000_000}[p50.group(2)]
    return rps, float(p50.group(1)) * scale


async def run(args: argparse.Namespace) -> None:
    from harness.images import ensure_echo_image

    image = ensure_echo_image("unix:///var/run/docker.sock")
    tag = f"chbench-{uuid.uuid4().hex[:6]}"
    firewall = Firewall()
    async with aiodocker.Docker() as docker:
        plain = BridgeNetwork(docker, f"{tag}-plain", egress="public")  # same shape
        guarded = [BridgeNetwork(docker, f"{tag}-fw-{i}", firewall=firewall, egress="public")
                   for i in range(args.networks)]
        controllers = {
            "no firewall": DockerInstanceController(docker=docker, network=plain,
                                                    name_prefix=f"{tag}-a-",
                                                    sandbox=Sandbox()),
            "firewall": DockerInstanceController(docker=docker, network=guarded[0],
                                                 name_prefix=f"{tag}-b-", sandbox=Sandbox()),
        }
        try:
            for bridge in guarded:
                await bridge.ensure()
            urls = {}
            for label, ctl in controllers.items():
                volume = f"{tag}-{label.replace(' ', '-')}"
                await docker.volumes.create({"Name": volume})
                await ctl.start("w", image, volume)
                upstream = await ctl.resolve_upstream("w")
                urls[label] = f"http://{upstream.host}:{upstream.port}/_echo/status/200"
            results: dict[str, dict[str, list[float]]] = {
                k: {"rps": [], "p50": []} for k in urls}
            for round_ in range(args.rounds):
                order = list(urls) if round_ % 2 == 0 else list(reversed(urls))
                for label in order:
                    rps, _ = await asyncio.to_thread(wrk, urls[label], 16, args.duration)
                    _, p50 = await asyncio.to_thread(wrk, urls[label], 1, args.duration)
                    results[label]["rps"].append(rps)
                    results[label]["p50"].append(p50)
                print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        finally:
            for ctl in controllers.values():
                await ctl.stop("w")
                await ctl.close()
            subprocess.run(f"docker volume rm $(docker volume ls -q | grep {tag}) "
                           f"; docker network rm $(docker network ls -q --filter name={tag})",
                           shell=True, capture_output=True)
            await firewall.prune()
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    print(f"\n## Firewall on the gateway's hop ({args.networks} firewalled networks, "
          f"{args.duration} s per measurement, median of {args.rounds} rounds)\n")
    print("| workspace network | req/s @16 conn | p50 @1 conn |")
    print("|---|---|---|")
    for label, m in med.items():
        print(f"| {label} | {m['rps']:.0f} | {m['p50']:.0f} us |")
    base, fw = med["no firewall"], med["firewall"]
    print(f"\nfirewall / no firewall: throughput {fw['rps'] / base['rps']:.3f}x, "
          f"p50 {fw['p50'] / base['p50']:.3f}x")


def main() -> None:
    ensure_tools({"wrk": "wrk"})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--networks", type=int, default=12)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
