"""Helpers shared by the test tiers: ports, subprocesses, health checks, test-only servers."""
