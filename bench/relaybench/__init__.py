"""Relay benchmark: socks64 against Dante and microsocks on loopback (driven by bench/run.py)."""
