"""The SOCKS front: listeners, one session per client, one module per request kind.

``server`` accepts and owns the shared services, ``session`` owns all client I/O and
turns each request into an outcome, the request handlers (``connect``, ``associate``,
``bind``, ``udp``, ``socks4``) decide on a narrow ``context``, and ``replies`` maps every
failure to its reply code.
"""
