"""asmkit's benchmarks and studies.

Run them as modules from the repository root, with asmkit installed (``pip install -e
.[bench]``) or ``PYTHONPATH=src``::

    python -m benchmarks.bench_reference --synthetic 1000
    python -m benchmarks.bench_engine --stage quantize --descriptors ukbench.npz
    python -m benchmarks.studies.quantizer_synthetic --synthetic 1000

Shared helpers (timing, memory, machine, data, arguments) are in ``benchmarks._common``.
"""
