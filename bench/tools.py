"""What the benchmarks run besides CodeHub, installed when missing (Debian's packages)."""

from __future__ import annotations

import os
import shutil
import subprocess


def ensure_tools(packages: dict[str, str]) -> None:
    """`packages`: command -> Debian package. Installs the packages of the commands that are
    missing (apt-get, as root); exits naming them when that is not possible."""
    missing = sorted({pkg for tool, pkg in packages.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {', '.join(missing)} and not root: "
                         f"sudo apt-get install -y {' '.join(missing)}")
    print(f"installing {' '.join(missing)} (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    still = [tool for tool in packages if shutil.which(tool) is None]
    if still:
        raise SystemExit(f"still missing after apt-get install: {', '.join(still)}")
