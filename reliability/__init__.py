"""Reliability and security runners (crash, load): the long local versions of
``tests/test_reliability_*.py``. Run from the repository root, e.g.
``python -m reliability.crash --kills 200``; see docs/reliability.md."""
