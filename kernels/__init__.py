"""Triton kernels for the StePPO hot paths, installed as `stepsearch.kernels`.

Each has a pure-torch twin with the same signature in `stepsearch.algo`; `launch` holds their shared launch code.
"""
