"""Benchmarks: ``make bench`` runs every ``bench/bench_*.py`` module's ``main()``.

Each benchmark prints a table that compares a measured figure with a limit or with a peer
measured in the same run. Timings never go in tests.
"""
