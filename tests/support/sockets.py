"""Which TCP sockets listen in this network namespace, and which process owns one (from /proc)."""
from __future__ import annotations

import os
from pathlib import Path


def listening_sockets() -> dict[tuple[str, int], str]:
    """Every listening TCP socket in this network namespace, from /proc/net/tcp and tcp6:
    (ip, port) -> socket inode."""
    import ipaddress

    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[(str(ipaddress.ip_address(raw)), int(port, 16))] = fields[9]
    return out


def is_loopback(ip: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(ip)
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def socket_owner(inode: str) -> str:
    """The command line (a Ray worker's is its process title, e.g. "ray::RayTrainWorker") of the
    process holding socket `inode`, or "" if it is gone."""
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return ""
