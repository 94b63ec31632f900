"""fx_adapters vs PEFT, in one process, interleaved: ``python -m benchmarks [--quick] [--json PATH] [--only ROW ...]``.

The figures are ratios to the base model (the plain eager transformers model) measured in the same run,
as issue 7 specifies; absolute times on a shared machine are noise. Modules: ``timing`` (the one timing
helper), ``models`` (the benchmark model and both contenders), ``rows`` (one function per table row).
"""
