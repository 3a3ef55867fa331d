"""codehub/backends/docker/firewall.py: the rules as text (pure), and as the host's iptables holds
them (real iptables, real bridge networks)."""

from __future__ import annotations

import subprocess

import aiodocker

from codehub.backends.docker.firewall import NON_PUBLIC, Firewall, NetworkPolicy, chain_names, rules
from codehub.backends.docker.network import BridgeNetwork, bridge_interface


def test_rules_depend_only_on_the_policy_and_not_on_the_number_of_workspaces() -> None:
    none = rules(NetworkPolicy("br-0123456789ab"))
    public = rules(NetworkPolicy("br-0123456789ab", egress="public", allow=("10.1.2.3/32",)))
    assert none == rules(NetworkPolicy("br-0123456789ab"))
    assert "-i br-0123456789ab -o br-0123456789ab -j DROP" in none
    assert "-A CODEHUB-F-" in none and none.count("\n-A ") == 6
    assert "-i br-0123456789ab -j DROP" in none.split("CODEHUB-I-")[0] + none
    for cidr in NON_PUBLIC:
        assert f"-d {cidr} -j DROP" in public and f"-d {cidr}" not in none
    # the operator's allow list comes before the blocked ranges
    assert public.index("-d 10.1.2.3/32 -j RETURN") < public.index("-d 10.0.0.0/8 -j DROP")


def _iptables(*args: str) -> str:
    return subprocess.run(["iptables", *args], capture_output=True, text=True).stdout


async def test_apply_hooks_a_networks_chains_once_and_prune_removes_them_with_the_network(
        docker: aiodocker.Docker, docker_prefix: str) -> None:
    firewall = Firewall()
    network = BridgeNetwork(docker, f"{docker_prefix}-fw", firewall=firewall, egress="public")
    await network.ensure()
    info = await (await docker.networks.get(f"{docker_prefix}-fw")).show()
    iface = bridge_interface(info)
    fwd, inp = chain_names(iface)
    await firewall.apply(NetworkPolicy(iface, egress="public"))  # again: no second jump
    assert _iptables("-S", "DOCKER-USER").count(f"-j {fwd}") == 2  # -i and -o
    assert _iptables("-S", "INPUT").count(f"-i {iface} -j {inp}") == 1
    assert "-j DROP" in _iptables("-S", fwd)
    await (await docker.networks.get(f"{docker_prefix}-fw")).delete()
    assert fwd in await firewall.prune()
    assert fwd not in _iptables("-S") and inp not in _iptables("-S")
