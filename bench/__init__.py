"""Writ benchmarks: every figure printed beside a limit measured in the same run."""
