"""The live-server fixtures for the deploy checks."""

from tests.server.conftest import client, live  # noqa: F401  (the live server fixtures)
