"""Secure multi-party computation (SPDZ), fixed-point encoding and the crypto provider.

Arrives with the SPDZ issue; it builds on :mod:`actors` and :mod:`protocol` only.
"""
