"""Transparent front vs the SOCKS path in a netnslab lab (driven by bench/transparent.py)."""
