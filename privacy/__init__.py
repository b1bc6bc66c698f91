"""Differential privacy: the DP-SGD sanitizer, the moments accountant, sampling and PATE.

Arrives with the DP issue; it builds on :mod:`actors` and :mod:`protocol` only.
"""
