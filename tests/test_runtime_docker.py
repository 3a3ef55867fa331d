"""DockerInstanceController against the real Docker engine and the echo workspace image.

Each test is named after a guarantee of codehub/backends/docker/containers.py. Every Docker object a
test makes has `docker_prefix` in its name, so the fixture removes it afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from harness import services
from isolation_support import exec_in

from codehub.backends.docker.containers import DockerInstanceController
from codehub.backends.docker.engine import engine_client
from codehub.backends.docker.sandbox import Sandbox
from codehub.constants import LABEL_MANAGED_BY, LABEL_WORKSPACE_ID
from codehub.interfaces import AdapterError, InstanceStatus, PermanentError
from codehub.model import InstanceState

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024


def make_controller(docker: aiodocker.Docker, prefix: str, **overrides: Any
                    ) -> DockerInstanceController:
    kwargs: dict[str, Any] = {
        "docker": docker,
        "network": f"{prefix}-net",
        "name_prefix": f"{prefix}-ws-",
        "memory_limit_bytes": 256 * MiB,
        "cpu_limit": 0.5,
        "start_timeout": 30.0,
    }
    kwargs.update(overrides)
    return DockerInstanceController(**kwargs)


@pytest.fixture
async def controller(docker: aiodocker.Docker, docker_prefix: str
                     ) -> AsyncIterator[DockerInstanceController]:
    ctl = make_controller(docker, docker_prefix)
    try:
        yield ctl
    finally:
        await ctl.close()


async def new_volume(docker: aiodocker.Docker, name: str) -> str:
    await docker.volumes.create({"Name": name})
    return name


@pytest.fixture
async def volume(docker: aiodocker.Docker, docker_prefix: str) -> str:
    return await new_volume(docker, f"{docker_prefix}-home-w1")


async def inspect(docker: aiodocker.Docker, name: str) -> dict[str, Any]:
    container = await docker.containers.get(name)
    return container._container


async def http_get(host: str, port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://{host}:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, await resp.text()


async def test_start_is_idempotent_and_reuses_the_running_container(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str, docker_prefix: str) -> None:
    await controller.start("w1", workspace_image, volume)
    first = await inspect(docker, f"{docker_prefix}-ws-w1")
    await controller.start("w1", workspace_image, volume)
    second = await inspect(docker, f"{docker_prefix}-ws-w1")
    assert first["Id"] == second["Id"]
    assert second["State"]["StartedAt"] == first["State"]["StartedAt"]

    for _ in range(2):
        status = await controller.get_status("w1")
        assert status.state is InstanceState.RUNNING
    upstreams = [await controller.resolve_upstream("w1") for _ in range(2)]
    assert upstreams[0] == upstreams[1]
    assert upstreams[0].port == 8080
    code, body = await http_get(upstreams[0].host, upstreams[0].port, "/healthz")
    assert code == 200 and "alive" in body


async def test_container_shape_labels_limits_mount_and_no_published_ports(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str, docker_prefix: str) -> None:
    await controller.start("w1", workspace_image, volume)
    info = await inspect(docker, f"{docker_prefix}-ws-w1")
    labels = info["Config"]["Labels"]
    assert labels[LABEL_MANAGED_BY] == "codehub"
    assert labels[LABEL_WORKSPACE_ID] == "w1"
    assert info["Config"]["Cmd"] == ["--auth", "none", "--bind-addr", "0.0.0.0:8080"]
    host = info["HostConfig"]
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["Memory"] == 256 * MiB
    assert host["NanoCpus"] == 500_000_000
    assert not host.get("PortBindings")
    assert not host.get("PublishAllPorts")
    assert not info["NetworkSettings"].get("Ports")
    mounts = [(m["Type"], m["Name"], m["Destination"]) for m in info["Mounts"]]
    assert mounts == [("volume", volume, "/home/coder")]
    assert list(info["NetworkSettings"]["Networks"]) == [f"{docker_prefix}-net"]

    net = await (await docker.networks.get(f"{docker_prefix}-net")).show()
    assert net["Internal"] is True
    assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert net["Driver"] == "bridge"
    assert net["Labels"][LABEL_MANAGED_BY] == "codehub"


async def test_host_reaches_workspace_on_the_internal_network(
        controller: DockerInstanceController, volume: str, workspace_image: str) -> None:
    """The gateway on the host must reach container addresses on an Internal bridge."""
    await controller.start("w1", workspace_image, volume)
    upstream = await controller.resolve_upstream("w1")
    code, body = await http_get(upstream.host, upstream.port, "/_echo/info")
    assert code == 200
    assert '"uid": 1000' in body or '"uid":1000' in body


async def test_stop_and_delete_are_idempotent_and_leave_the_volume(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str) -> None:
    await controller.start("w1", workspace_image, volume)
    for _ in range(2):
        await controller.stop("w1")
        assert (await controller.get_status("w1")).state is InstanceState.MISSING
    with pytest.raises(AdapterError):
        await controller.resolve_upstream("w1")
    await controller.start("w1", workspace_image, volume)
    for _ in range(2):
        await controller.delete("w1")
        assert (await controller.get_status("w1")).state is InstanceState.MISSING
    await docker.volumes.get(volume)  # still there


async def test_start_replaces_a_container_killed_behind_our_back(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str, docker_prefix: str) -> None:
    await controller.start("w1", workspace_image, volume)
    name = f"{docker_prefix}-ws-w1"
    old = await inspect(docker, name)
    await docker.containers.container(name).kill()
    await docker.containers.container(name).wait()
    for _ in range(2):
        status = await controller.get_status("w1")
        assert status.state is InstanceState.FAILED
        assert status.exit_code == 137
    with pytest.raises(AdapterError):
        await controller.resolve_upstream("w1")

    await controller.start("w1", workspace_image, volume)
    new = await inspect(docker, name)
    assert new["Id"] != old["Id"]
    assert (await controller.get_status("w1")).state is InstanceState.RUNNING
    await controller.start("w1", workspace_image, volume)
    assert (await inspect(docker, name))["Id"] == new["Id"]


async def test_start_recreates_a_container_removed_behind_our_back(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str, docker_prefix: str) -> None:
    await controller.start("w1", workspace_image, volume)
    await docker.containers.container(f"{docker_prefix}-ws-w1").delete(force=True)
    for _ in range(2):
        assert (await controller.get_status("w1")).state is InstanceState.MISSING
    for _ in range(2):
        with pytest.raises(AdapterError):
            await controller.resolve_upstream("w1")
    await controller.stop("w1")
    await controller.delete("w1")
    for _ in range(2):
        await controller.start("w1", workspace_image, volume)
        assert (await controller.get_status("w1")).state is InstanceState.RUNNING


async def test_stopped_container_reports_stopped_and_start_replaces_it(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str, docker_prefix: str) -> None:
    await controller.start("w1", workspace_image, volume)
    name = f"{docker_prefix}-ws-w1"
    await docker.containers.container(name).stop(t=5)  # SIGTERM: the echo server exits 0
    status = await controller.get_status("w1")
    assert status.state is InstanceState.STOPPED
    assert status.exit_code == 0
    await controller.start("w1", workspace_image, volume)
    assert (await controller.get_status("w1")).state is InstanceState.RUNNING


async def test_start_replaces_a_running_container_with_another_spec(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str, docker_prefix: str) -> None:
    await controller.start("w1", workspace_image, volume)
    old = await inspect(docker, f"{docker_prefix}-ws-w1")
    other = await new_volume(docker, f"{docker_prefix}-home-w1-r2")
    await controller.start("w1", workspace_image, other)
    new = await inspect(docker, f"{docker_prefix}-ws-w1")
    assert new["Id"] != old["Id"]
    assert [m["Name"] for m in new["Mounts"]] == [other]


async def test_missing_image_is_a_permanent_error_naming_it(
        controller: DockerInstanceController, volume: str, docker_prefix: str) -> None:
    image = f"codehub-no-such-image-{docker_prefix}:v1"
    with pytest.raises(PermanentError) as caught:
        await controller.start("w1", image, volume)
    assert image in str(caught.value)
    assert caught.value.retryable is False
    assert (await controller.get_status("w1")).state is InstanceState.MISSING


async def test_start_timeout_reports_last_log_lines_and_status_is_starting(
        docker: aiodocker.Docker, volume: str, workspace_image: str, docker_prefix: str
) -> None:
    # The server listens on 9999 while we probe 8080: running, never healthy.
    ctl = make_controller(docker, docker_prefix, start_timeout=4.0,
                          command=["--auth", "none", "--bind-addr", "0.0.0.0:9999"])
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(AdapterError) as caught:
            await ctl.start("w1", workspace_image, volume)
        assert loop.time() - began < 20
        assert not isinstance(caught.value, PermanentError)
        assert "within 4s" in str(caught.value)
        assert "codehub-echo listening on 0.0.0.0:9999" in str(caught.value)
        status = await ctl.get_status("w1")
        assert status.state is InstanceState.STARTING
    finally:
        await ctl.close()


async def test_container_that_exits_while_starting_fails_fast_with_its_logs(
        docker: aiodocker.Docker, volume: str, workspace_image: str, docker_prefix: str
) -> None:
    ctl = make_controller(docker, docker_prefix, start_timeout=30.0,
                          command=["--bind-addr", "0.0.0.0:not-a-port"])
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(AdapterError) as caught:
            await ctl.start("w1", workspace_image, volume)
        assert loop.time() - began < 20
        assert "exited with code 1" in str(caught.value)
        assert "ValueError" in str(caught.value)
        status = await ctl.get_status("w1")
        assert status.state is InstanceState.FAILED
        assert status.exit_code == 1
    finally:
        await ctl.close()


async def test_a_gateway_container_must_run_in_the_hosts_network_and_then_reaches_workspaces(
        docker: aiodocker.Docker, volume: str, workspace_image: str, docker_prefix: str
) -> None:
    """Only the host's network namespace reaches workspaces (the firewall drops traffic
    between containers of one network): a gateway container on a bridge is refused with
    what to do, one run with --network host reaches the workspace."""
    bridged = f"{docker_prefix}-gateway-bridged"
    await docker.containers.run({"Image": workspace_image}, name=bridged)
    ctl = make_controller(docker, docker_prefix, gateway_container=bridged)
    try:
        with pytest.raises(PermanentError, match="--network host"):
            await ctl.start("w1", workspace_image, volume)
    finally:
        await ctl.close()
    gateway = f"{docker_prefix}-gateway"
    await docker.containers.run({"Image": workspace_image,
                                 "HostConfig": {"NetworkMode": "host"}}, name=gateway)
    ctl = make_controller(docker, docker_prefix, gateway_container=gateway)
    try:
        await ctl.start("w1", workspace_image, volume)
        upstream = await ctl.resolve_upstream("w1")
        script = ("import urllib.request;"
                  f"print(urllib.request.urlopen('http://{upstream.host}:{upstream.port}"
                  "/healthz', timeout=5).status)")
        run = await docker.containers.container(gateway).exec(["python3", "-c", script])
        out = b""
        async with run.start(detach=False) as stream:
            while (msg := await stream.read_out()) is not None:
                out += msg.data
        assert (await run.inspect())["ExitCode"] == 0, out
        assert out.decode().strip() == "200"
    finally:
        await ctl.close()


async def test_list_managed_reports_our_workspace_containers_only(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str, docker_prefix: str) -> None:
    await controller.start("w1", workspace_image, volume)
    await docker.containers.create(
        {"Image": workspace_image,
         "Labels": {LABEL_MANAGED_BY: "codehub", LABEL_WORKSPACE_ID: "w2",
                    "codehub.role": "storage-helper"}},
        name=f"{docker_prefix}-ws-helper-like")
    await docker.containers.create({"Image": workspace_image}, name=f"{docker_prefix}-ws-x")
    found = await controller.list_managed()
    assert [(r.kind, r.name, r.workspace_id) for r in found] == [
        ("container", f"{docker_prefix}-ws-w1", "w1")]
    await controller.stop("w1")
    assert await controller.list_managed() == []


async def test_invalid_workspace_id_is_rejected_before_touching_docker(
        controller: DockerInstanceController, volume: str, workspace_image: str) -> None:
    for bad in ("../x", "", "a/b", "-x", "x" * 200, "Upper", "a_b", "a.b", "x-"):
        with pytest.raises(PermanentError):
            await controller.get_status(bad)


async def test_start_refuses_a_missing_volume_instead_of_creating_a_blank_home(
        controller: DockerInstanceController, docker: aiodocker.Docker, workspace_image: str,
        docker_prefix: str) -> None:
    missing = f"{docker_prefix}-home-gone"
    with pytest.raises(PermanentError) as caught:
        await controller.start("w1", workspace_image, missing)
    assert missing in str(caught.value)
    volumes = (await docker.volumes.list()).get("Volumes") or []
    assert missing not in {v["Name"] for v in volumes}
    assert (await controller.get_status("w1")).state is InstanceState.MISSING


async def test_start_replaces_a_running_container_that_never_became_healthy(
        docker: aiodocker.Docker, volume: str, workspace_image: str, docker_prefix: str
) -> None:
    ctl = make_controller(docker, docker_prefix, start_timeout=2.0,
                          command=["--auth", "none", "--bind-addr", "0.0.0.0:9999"])
    name = f"{docker_prefix}-ws-w1"
    try:
        with pytest.raises(AdapterError):
            await ctl.start("w1", workspace_image, volume)
        first = (await inspect(docker, name))["Id"]
        # Same spec, running for longer than start_timeout, still unhealthy: a fresh one.
        with pytest.raises(AdapterError):
            await ctl.start("w1", workspace_image, volume)
        assert (await inspect(docker, name))["Id"] != first
    finally:
        await ctl.close()


async def test_a_foreign_container_with_our_name_is_never_touched(
        controller: DockerInstanceController, docker: aiodocker.Docker, volume: str,
        workspace_image: str, docker_prefix: str) -> None:
    name = f"{docker_prefix}-ws-w1"
    await docker.containers.create({"Image": workspace_image}, name=name)
    for call in (controller.stop("w1"), controller.delete("w1"),
                 controller.start("w1", workspace_image, volume)):
        with pytest.raises(PermanentError):
            await call
    assert (await inspect(docker, name))["Config"]["Image"] == workspace_image


async def test_workspace_runs_without_capabilities_new_privileges_or_a_writable_root(
        docker: aiodocker.Docker, volume: str, workspace_image: str, docker_prefix: str
) -> None:
    """The Sandbox as Docker applies it, and as a process inside sees it: as the workspace
    user and as root through `docker exec -u 0`."""
    ctl = make_controller(docker, docker_prefix,
                          sandbox=Sandbox(pids_limit=300, tmp_size_bytes=64 * MiB))
    try:
        await ctl.start("w1", workspace_image, volume)
    finally:
        await ctl.close()
    name = f"{docker_prefix}-ws-w1"
    host = (await inspect(docker, name))["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PidsLimit"] == 300
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={64 * MiB},mode=1777"}
    assert host["Memory"] == 256 * MiB and host["MemorySwap"] == 256 * MiB
    for user in ("", "0"):
        _, out = await exec_in(docker, name, [
            "sh", "-c", "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status; "
            "touch /codehub-root-write 2>&1; echo rc=$?; grep ' /tmp ' /proc/mounts; "
            f"touch /tmp/ok{user} && echo tmp-writable; "
            f"touch /home/coder/ok{user} && echo home-writable"], user=user)
        status = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
        assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0" * 16, out
        assert status["NoNewPrivs"] == "1", out
        assert "Read-only file system" in out and "rc=1" in out, out
        assert "nosuid,nodev" in out and "tmp-writable" in out, out
        # Root without capabilities has no power over the workspace user's files.
        assert ("home-writable" in out) == (user == ""), out


async def test_a_fork_bomb_stops_at_the_pids_limit_and_other_workspaces_keep_serving(
        docker: aiodocker.Docker, workspace_image: str, docker_prefix: str) -> None:
    ctl = make_controller(docker, docker_prefix, sandbox=Sandbox(pids_limit=256))
    try:
        for ws in ("bomb", "calm"):
            await ctl.start(ws, workspace_image,
                            await new_volume(docker, f"{docker_prefix}-home-{ws}"))
        bomb = (
            "import os, signal, time\n"
            "made = 0\n"
            "for _ in range(10000):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError as exc:\n"
            "        print('stopped', made, exc.errno, flush=True); break\n"
            "    if pid == 0:\n"
            "        time.sleep(120); os._exit(0)\n"
            "    made += 1\n"
            "else:\n"
            "    print('not stopped', made, flush=True)\n"
            "os.killpg(0, signal.SIGKILL)\n")
        calm = await ctl.resolve_upstream("calm")
        served: list[int] = []

        async def keep_asking() -> None:
            while True:
                served.append((await http_get(calm.host, calm.port, "/healthz"))[0])
                await asyncio.sleep(0.05)

        asker = asyncio.create_task(keep_asking())
        try:
            _, out = await exec_in(docker, f"{docker_prefix}-ws-bomb",
                                   ["setsid", "python3", "-c", bomb])
        finally:
            asker.cancel()
            await asyncio.gather(asker, return_exceptions=True)
        words = out.split()
        assert words[0] == "stopped", out
        assert int(words[1]) < 256 and int(words[2]) == 11, out  # EAGAIN at the limit
        assert served and set(served) == {200}
        assert await ctl.get_status("calm") == InstanceStatus(InstanceState.RUNNING)
        assert await ctl.get_status("bomb") == InstanceStatus(InstanceState.RUNNING)
    finally:
        await ctl.close()


async def test_engine_client_starts_without_an_engine_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An engine that does not answer at start is a warning, not a failed start: the
    client is handed out (workspaces wait for the engine) and closed on the way out."""
    caplog.set_level("INFO", logger="codehub.backends.docker.engine")
    async with engine_client(f"unix://{tmp_path}/no-engine.sock") as docker:
        assert isinstance(docker, aiodocker.Docker)
    assert "not answering" in caplog.text
    assert docker.session.closed


async def test_engine_client_logs_the_engines_version(
        docker: aiodocker.Docker, docker_engine: services.DockerEngine,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="codehub.backends.docker.engine")
    version = (await docker.version())["Version"]
    async with engine_client(docker_engine.url) as client:
        assert (await client.version())["Version"] == version
    assert f"docker: engine {version}" in caplog.text
