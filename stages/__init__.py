"""convflow's pipeline stages: one module per DVC stage (``python -m stages.<name>``).

Each stage module has pure functions (arrays in, arrays/models/metrics out) and a thin
``main()`` that reads params and paths, loads, calls the core and writes.
"""
