from setuptools import setup; setup(cffi_modules=["agent/native/_build_scan.py:ffibuilder"])  # noqa: E702
