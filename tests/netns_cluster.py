"""Several hosts on one machine, for tests/test_multihost.py: hvdbert/netcluster.py's namespaces."""
from hvdbert.netcluster import Cluster, quote, rate_bits_per_s, run, unavailable

__all__ = ["Cluster", "quote", "rate_bits_per_s", "run", "unavailable"]
