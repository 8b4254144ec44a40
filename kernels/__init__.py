"""Triton kernels for the StePPO hot paths, installed as `stepsearch.kernels`. Each has a pure-torch twin in `stepsearch.algo`."""
