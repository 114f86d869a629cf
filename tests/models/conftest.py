"""Fixtures of the model tests."""

import pytest

from tests.models.helpers import ARCHS


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
