"""Packaging for thriftprobe. The version has one source: thriftprobe/_version.py."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "thriftprobe" / "_version.py").read_text(), re.M).group(1)

setup(
    name="thriftprobe",
    version=VERSION,
    description="Service discovery, weighted balancing and live governance for thriftpy2 services "
    "(ZooKeeper registry, Redis settings, MySQL appkeys)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="The thriftprobe developers",
    license="MIT",
    keywords="thrift thriftpy2 rpc service-discovery zookeeper load-balancing governance",
    packages=find_packages(include=["thriftprobe", "thriftprobe.*"]),
    package_data={"thriftprobe": ["py.typed", "config.template.yml"]},
    zip_safe=False,
    python_requires=">=3.9",
    # Minimums are the versions the CI installs in its lowest-versions run (tests/integration/test_distribution.py).
    install_requires=[
        "thriftpy2>=0.7.1",
        "kazoo>=2.9.0",
        "redis>=4.3.6",
        "PyMySQL>=1.1.0",
        "PyYAML>=6.0.1",
    ],
    extras_require={
        "console": ["Flask>=2.3"],
        "metrics": ["prometheus-client>=0.17"],
        # Providers and consumers in a gevent-patched process (README "gevent"); thriftprobe
        # never imports it unless the process is patched. Tested with 26.9.
        "gevent": ["gevent>=22.10.2"],
        # The checks CI runs on every submission (tests/lint.sh, which also pins the runtime
        # dependencies whose types mypy reads: tests/lint-constraints.txt); pinned, so a new
        # release never fails a submission that changed nothing.
        "lint": [
            "Flask>=2.3",  # the console's types
            "prometheus-client>=0.17",  # the metrics' types
            "ruff==0.17.6",
            "mypy==2.4.1",
            "types-PyYAML==6.0.12.20261113",
            "types-PyMySQL==1.2.0.20260923",
        ],
        "test": [
            "pytest>=7",
            "Flask>=2.3",
            "prometheus-client>=0.17",
            "playwright>=1.40",
            "scipy>=1.9",
            "thrift>=0.20",  # the Apache Thrift library, for generated peers
            "gevent>=22.10.2",  # tests/integration/test_gevent.py
            "build>=1.0",
            "twine>=5",
            "pypiserver>=2.1",
        ],
    },
    entry_points={"console_scripts": ["thriftprobe = thriftprobe.admin.cli:main"]},
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Developers",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: System :: Distributed Computing",
        "Typing :: Typed",
    ],
)
