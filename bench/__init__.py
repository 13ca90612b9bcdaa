"""tracetape's benchmark harness (not tests: nothing here asserts on timings).

`python -m bench.run [--quick] [--only NAME,...] [--json-out FILE]`; one module per benchmark, each exposing
`run(ctx) -> list[dict]` rows. Every comparison is a ratio of figures measured in the same run.
"""
