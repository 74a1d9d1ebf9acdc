"""The live loopback server of tests/server, for the benchmarks that drive one."""

from tests.server.conftest import live  # noqa: F401 (a fixture)
