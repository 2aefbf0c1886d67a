"""Peer training scripts that `python -m hvdbert.bench --peers ...` runs beside hvdbert."""
