"""Tests of jaxcl/ops, one test_<module>.py per module of the package."""
