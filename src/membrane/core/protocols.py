"""IP protocol numbers and names, shared by the policy engine and the datapath (no dependencies).

- :data:`PROTOCOLS` -- the protocol names policies use (``TCP``, ``ICMPv6``, ...) → IP protocol number;
- :data:`PROTOCOL_NAMES` -- IP protocol number → the lower-case name nft prints (``tcp``,
  ``ipv6-icmp``), for the protocols that have one.
"""

from __future__ import annotations

#: IP protocol numbers of the protocol names policies use.
PROTOCOLS = {"ICMP": 1, "IGMP": 2, "TCP": 6, "UDP": 17, "ICMPv6": 58, "VRRP": 112, "SCTP": 132}
#: The names nft uses for protocol numbers (``meta l4proto``/``inet_proto`` values).
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}
