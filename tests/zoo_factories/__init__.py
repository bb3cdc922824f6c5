"""Small model factories for ``package.module:factory`` specs in the tests."""
