"""The sections of ``scripts/benchmark.py``, one module each.

Every section module has a ``TITLE`` (its heading in ``tables.md``), a
``run(...)`` function returning the section's JSON-ready results, a
``table(section)`` function turning them into Markdown, and, for ``step``,
``refresh`` and ``memory``, a ``plot(section, out_dir)`` function writing one
PNG. :mod:`benchmark_sections.shared` holds what several sections use (the
optimizers, the parameter sets, the FLOP count).

The section modules import JAX when imported: ``scripts/benchmark.py``
imports them only after selecting the device. This package module imports
nothing, so the front can read :data:`SECTIONS` and :data:`FREQUENCY` while
parsing its arguments.
"""

# In the order they run by default and appear in tables.md.
SECTIONS = ('step', 'refresh', 'compile', 'memory', 'train_step', 'versus_torch',
            'sharded')
# The refresh frequency of every eigenbasis optimizer the sections time.
FREQUENCY = 10
