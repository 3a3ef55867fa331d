"""Guarantees: each subpackage implements the adapter interfaces of codehub.interfaces for
one backend and passes the conformance suite (tests/conformance/) that states their
contract; nothing above the interfaces imports a backend but app.py and the tests."""
