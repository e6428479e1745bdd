"""The session fixtures every test file may use. Their code, and the helpers test files import, live in
snapshots.py: a module named `conftest` would be shadowed by tests/fuzz/conftest.py when imported by name."""

from snapshots import (  # noqa: F401  (pytest finds fixtures by name here)
    tiny_canny_snapshot, tiny_dev_snapshot, tiny_fill_snapshot, tiny_kontext_snapshot, tiny_redux, tiny_snapshot)
