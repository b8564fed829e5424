"""Triton kernels of fastpref, installed as ``fastpref.kernels``."""
