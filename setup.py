"""Build script. Metadata lives in pyproject.toml; this file is where the C++/CUDA extension's build will go."""

from setuptools import setup

setup()
