from setuptools import setup; setup()  # noqa: E702 -- cffi_modules are wired in by the node role
