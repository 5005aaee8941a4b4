"""Tests of jaxcl/losses, one test_<module>.py per module of the package."""
