"""The parts of ``scripts/experiments.py``, one module each.

Every part module has ``TITLE`` (its heading in tables.md), ``run(quick,
out_dir)`` returning its JSON section, ``tables(section)`` returning its
markdown and ``plot(section, out_dir)`` returning the paths of its PNGs
(kl_vs_muon draws none). ``sweep`` holds what the language-model parts share.
The modules import JAX.
"""
