"""Command-line tools around maxdpo (benchmarks, SNR scan, SLERP merge, tiny-model maker); importable for tests."""
