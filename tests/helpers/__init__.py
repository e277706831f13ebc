"""Reusable test helpers (import as ``from tests.helpers.gradcheck import ...``)."""
