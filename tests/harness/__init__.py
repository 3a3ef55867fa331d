"""Test harness: real services (services.py) and registry-free images (images.py).

Guarantees: importing this package starts nothing; tests/conftest.py decides when.
"""
