"""Two "nodes" on one machine: two network namespaces joined by a veth pair, each process
started in one with its own host name (``unshare --uts``) and its own /etc/hosts
(``ip netns exec`` mounts /etc/netns/<name>/hosts over /etc/hosts).

Used by tests/cluster/test_two_nodes.py; needs root and iproute2 (:func:`unavailable` says why not).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.{}.{}"

# /etc/hosts layouts: (node a's file, node b's file); {a}/{b} are the nodes' addresses.
LAYOUTS = {
    # every node knows every other by name
    "shared": ("127.0.0.1 localhost\n{a} nodea\n{b} nodeb\n",) * 2,
    # rank 0's node calls itself by a long name the others do not know
    "short-name": (
        "127.0.0.1 localhost\n{a} nodea.cluster.example nodea\n{b} nodeb\n",
        "127.0.0.1 localhost\n{a} nodea\n{b} nodeb\n",
    ),
    # Debian/Ubuntu: a node's own name is 127.0.1.1
    "127.0.1.1": (
        "127.0.0.1 localhost\n127.0.1.1 nodea\n{b} nodeb\n",
        "127.0.0.1 localhost\n{a} nodea\n127.0.1.1 nodeb\n",
    ),
}


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux)"
    return None


@dataclass
class TwoNodes:
    """Namespaces ``<tag>a`` and ``<tag>b`` with addresses 10.213.<n>.1 and .2."""

    tag: str = field(default_factory=lambda: f"spmd{os.getpid() % 10000}")
    net: int = field(default_factory=lambda: os.getpid() % 200 + 20)

    @property
    def names(self) -> dict[str, str]:
        return {"nodea": self.tag + "a", "nodeb": self.tag + "b"}

    @property
    def addresses(self) -> dict[str, str]:
        return {"nodea": SUBNET.format(self.net, 1), "nodeb": SUBNET.format(self.net, 2)}

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def start(self) -> None:
        a, b = self.names["nodea"], self.names["nodeb"]
        self._ip("netns", "add", a)
        self._ip("netns", "add", b)
        self._ip("link", "add", self.tag + "va", "type", "veth", "peer", "name", self.tag + "vb")
        for node, netns in self.names.items():
            link = self.tag + ("va" if node == "nodea" else "vb")
            self._ip("link", "set", link, "netns", netns)
            self._ip("-n", netns, "addr", "add", self.addresses[node] + "/24", "dev", link)
            self._ip("-n", netns, "link", "set", link, "up")
            self._ip("-n", netns, "link", "set", "lo", "up")
        self.set_layout("shared")

    def set_layout(self, layout: str) -> None:
        for node, text in zip(("nodea", "nodeb"), LAYOUTS[layout], strict=True):
            directory = Path("/etc/netns") / self.names[node]
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text(
                text.format(a=self.addresses["nodea"], b=self.addresses["nodeb"])
            )

    def command(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``node``: in its namespace, under its host name."""
        return [
            "ip",
            "netns",
            "exec",
            self.names[node],
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {node} && exec "$@"',
            "sh",
            *argv,
        ]

    def launcher_script(self, directory: Path) -> Path:
        """An executable for hydra's ``-launcher ssh -launcher-exec``:
        ``SCRIPT [-x] HOST CMD...``."""
        script = directory / "enter_node.sh"
        script.write_text(
            "#!/bin/sh\n"
            '[ "$1" = "-x" ] && shift\n'
            'host="$1"; shift\n'
            f'case "$host" in nodea) ns={self.names["nodea"]} ;; '
            f"nodeb) ns={self.names['nodeb']} ;; "
            '*) echo "unknown host $host" >&2; exit 1 ;; esac\n'
            """exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec sh -c "$*"' """
            '"$host" "$@"\n'
        )
        script.chmod(0o755)
        return script

    def stop(self) -> None:
        for netns in self.names.values():
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
