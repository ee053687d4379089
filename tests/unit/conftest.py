"""Unit tests never see the machine's shared image cache.

``SOCKLAB_CACHE`` points the harness at a cache other checkouts boot from; a unit test that builds a
fake entry (tests/unit/test_image.py) would write it there, under the real recipe's name.
"""

import pytest


@pytest.fixture(autouse=True)
def _private_image_cache(monkeypatch):
    monkeypatch.delenv("SOCKLAB_CACHE", raising=False)
