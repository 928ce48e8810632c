"""The hosts of the network tests: a server on the internet, a home LAN behind a NAT router, a TURN
server, a viewer elsewhere, and a cloud VM behind a 1:1 NAT.

```
                    internet 203.0.113.0/24 (a bridge in namespace `net`)
   +-----------+-------------+--------------+---------------+------------------+
 server      turn         viewer        home router        cloud 1:1 NAT
 .10         .20          .30           .2 (masquerade)    .40 <-> 10.40.0.10
                                          |                   |
                                  home LAN 192.168.77.0/24   VM 10.40.0.10
                                  laptop .10                 (a server whose
                                                              interface is private)
```

Addresses are from the documentation ranges (RFC 5737 TEST-NET-3, RFC 1918): nothing here can
reach, or be reached from, a real network, and the namespaces have no link to the machine's own.
The home router masquerades like a home NAT (endpoint-independent mapping, address-and-port-
dependent filtering: Linux conntrack); the cloud NAT maps every port of its public address to the
VM and back, as cloud providers do for a VM's public IP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tests.net import netns

SERVER_IP = "203.0.113.10"
TURN_IP = "203.0.113.20"
VIEWER_IP = "203.0.113.30"
HOME_ROUTER_WAN_IP = "203.0.113.2"
HOME_ROUTER_LAN_IP = "192.168.77.1"
LAPTOP_IP = "192.168.77.10"
CLOUD_PUBLIC_IP = "203.0.113.40"
CLOUD_GATEWAY_IP = "10.40.0.1"
VM_IP = "10.40.0.10"

HOME_NAT = """
table ip home_nat {
  chain postrouting { type nat hook postrouting priority srcnat; oifname "wan" masquerade; }
}
"""
CLOUD_NAT = f"""
table ip cloud_nat {{
  chain prerouting {{ type nat hook prerouting priority dstnat; ip daddr {CLOUD_PUBLIC_IP} dnat to {VM_IP}; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; ip saddr {VM_IP} snat to {CLOUD_PUBLIC_IP}; }}
}}
"""


LOSS_TABLE = "loss"


def loss_ruleset(uplink: str | None = None, downlink: str | None = None) -> str:
    """An nftables ruleset for the home router that drops UDP packets forwarded LAN -> WAN (`uplink`)
    and WAN -> LAN (`downlink`) matching an nft expression: `numgen random mod 100 < 5` (5% at
    random), `numgen inc mod 1000000 < 20` (the next 20 packets: a burst; the rule counts only
    the packets that reach it, so only that direction's). None: that direction loses nothing.
    Loading it replaces the previous loss rules (it deletes the table first)."""
    rules = [
        f'iifname "{src}" oifname "{dst}" meta l4proto udp {expression} counter drop'
        for src, dst, expression in (("lan", "wan", uplink), ("wan", "lan", downlink))
        if expression is not None
    ]
    body = "\n    ".join(rules)
    return f"""
table ip {LOSS_TABLE}
delete table ip {LOSS_TABLE}
table ip {LOSS_TABLE} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    {body}
  }}
}}
"""


@dataclass
class TestBed:
    """Namespace names of each host; `build()` makes them all, `teardown()` removes them all."""

    tag: str = field(default_factory=lambda: f"{netns.PREFIX}{os.getpid() % 100000}")
    made: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    @property
    def server(self) -> str:
        return self.ns("srv")

    @property
    def turn(self) -> str:
        return self.ns("turn")

    @property
    def viewer(self) -> str:
        return self.ns("view")

    @property
    def home(self) -> str:
        return self.ns("home")

    @property
    def vm(self) -> str:
        return self.ns("vm")

    def build(self) -> None:
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    def _build(self) -> None:
        internet = self._add("net")
        netns.run(internet, ["ip", "link", "add", "br0", "type", "bridge"])
        netns.run(internet, ["ip", "link", "set", "br0", "up"])
        for role, ip in (("srv", SERVER_IP), ("turn", TURN_IP), ("view", VIEWER_IP)):
            host = self._add(role)
            self._plug(internet, role, host)
            netns.address(host, "wan", f"{ip}/24")

        router = self._add("nat")
        self._plug(internet, "nat", router)
        netns.address(router, "wan", f"{HOME_ROUTER_WAN_IP}/24")
        home = self._add("home")
        netns.link(router, "lan", home, "lan")
        netns.address(router, "lan", f"{HOME_ROUTER_LAN_IP}/24")
        netns.address(home, "lan", f"{LAPTOP_IP}/24")
        netns.route(home, "default", HOME_ROUTER_LAN_IP)
        netns.run(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        netns.nft(router, HOME_NAT)

        cloud = self._add("cnat")
        self._plug(internet, "cnat", cloud)
        netns.address(cloud, "wan", f"{CLOUD_PUBLIC_IP}/24")
        vm = self._add("vm")
        netns.link(cloud, "lan", vm, "lan")
        netns.address(cloud, "lan", f"{CLOUD_GATEWAY_IP}/24")
        netns.address(vm, "lan", f"{VM_IP}/24")
        netns.route(vm, "default", CLOUD_GATEWAY_IP)
        netns.run(cloud, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        netns.nft(cloud, CLOUD_NAT)

    @property
    def router(self) -> str:
        """The home LAN's NAT router (the laptop's uplink and downlink pass it)."""
        return self.ns("nat")

    def set_loss(self, uplink: str | None = None, downlink: str | None = None) -> None:
        """Drop packets on the home router (`loss_ruleset`); both None: no loss."""
        netns.nft(self.router, loss_ruleset(uplink, downlink))

    def dropped(self) -> int:
        """Packets the current loss rules dropped so far."""
        listing = netns.run(self.router, ["nft", "list", "table", "ip", LOSS_TABLE], check=False).stdout
        words = listing.split()
        return sum(int(words[i + 1]) for i, word in enumerate(words[:-1]) if word == "packets")

    def _add(self, role: str) -> str:
        name = self.ns(role)
        netns.add(name)
        self.made.append(name)
        return name

    def _plug(self, internet: str, role: str, host: str) -> None:
        """A cable from `host`'s `wan` interface to a port of the internet bridge."""
        port = f"p-{role}"
        netns.link(internet, port, host, "wan")
        netns.run(internet, ["ip", "link", "set", port, "master", "br0"])

    def teardown(self) -> None:
        for name in reversed(self.made):
            netns.remove(name)
        self.made.clear()
