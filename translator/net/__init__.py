"""Network services the gateway consults: addresses, DNS, Happy Eyeballs, interfaces.

Nothing here knows SOCKS: ``addresses`` holds the IP helpers every layer shares,
``resolver`` the aiodns resolver, ``happy_eyeballs`` the RFC 8305 connector,
``interfaces`` the pyroute2 interface table and ``watcher`` its netlink thread.
"""
