"""Moving traffic once a request has succeeded: TCP relays, UDP associations, multicast.

``channel`` wraps the client socket, ``tcp`` relays two sockets (splice when it pays),
``udp`` is one UDP association (with ``fragments`` reassembly), ``multicast`` the group
memberships they share, ``listeners`` the BIND listening sockets. Nothing here reads a
SOCKS request or imports the gateway: what a relay needs is handed to it.
"""
