"""Packaging for thriftprobe. The version has one source: thriftprobe/__init__.py."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "thriftprobe" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="thriftprobe",
    version=VERSION,
    description="Service discovery, weighted balancing and live governance for thriftpy2 services "
    "(ZooKeeper registry, Redis settings, MySQL appkeys)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["thriftprobe", "thriftprobe.*"]),
    package_data={"thriftprobe": ["py.typed"]},
    python_requires=">=3.9",
    install_requires=[
        "thriftpy2>=0.5.2",
        "kazoo>=2.9",
        "redis>=4.3",
        "PyMySQL>=1.1",
        "PyYAML>=6.0",
    ],
    extras_require={
        "console": ["Flask>=2.3"],
        "test": ["pytest>=7", "Flask>=2.3", "playwright>=1.40", "scipy>=1.9"],
    },
    entry_points={"console_scripts": ["thriftprobe = thriftprobe.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Distributed Computing",
    ],
)
