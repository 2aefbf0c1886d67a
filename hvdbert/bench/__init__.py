"""Benchmark hvdbert's training step side by side with the peers users compare it with.

`python -m hvdbert.bench` (cli.py) runs it. The pieces: flops.py (FLOPs of a training pass, the
measured peak, memory), measure.py (the timed loop over hvdbert's own step), orchestrate.py (each
configuration in its own processes, the peers, repeats and ratios), report.py (table, plot) and
peers/ (the Trainer, DDP and DDP-on-hvdbert's-model scripts).
"""
from hvdbert.bench.flops import SHAPES, training_flops_per_sequence

__all__ = ["SHAPES", "training_flops_per_sequence"]
