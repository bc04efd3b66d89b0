"""Shared fixtures.  Helpers to start real processes live in tests/stack.py."""
import pytest

from tests.stack import running_stack


@pytest.fixture(scope="module")
def stack():
    """The whole service under supervisord on free ports with the tiny test model
    (tests/conformance/main); one per test module."""
    with running_stack() as s:
        yield s
