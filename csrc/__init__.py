"""CUDA C++ sources of fastpref, shipped as package data (``fastpref.csrc``) for the ninja JIT build."""
