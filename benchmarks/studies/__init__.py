"""Studies: accuracy of feature settings on UKBench, and the quantizer's design choices.

Run as modules from the repository root, e.g. ``python -m benchmarks.studies.sift_ukbench``.
"""
