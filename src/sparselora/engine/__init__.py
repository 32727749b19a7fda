"""The engine: what a library user needs to make a PEFT model's frozen branch sparse.

Estimator, channel selection, sparse ops, the wrapped blocks, the exact savings, the model
family registry, the handle and its step schedule, and the analytic FLOPs model. Imports
nothing from `sparselora.recipes`, `sparselora.perf` or `sparselora.cli`.
"""
