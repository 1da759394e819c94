"""The performance tools: the canonical layer set (canonical), side-by-side
benchmarks (bench, bench_net, bench_train), the regression gates (gate) and
the reference check of every backend (verify). The ``convkern`` command runs
them; nothing in the library imports them."""
