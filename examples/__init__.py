"""Runnable examples; each one is exercised by the test suite so that none rots."""
