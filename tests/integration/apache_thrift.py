"""The demo IDL compiled by Apache Thrift's compiler (Debian's thrift-compiler, installed by
tests/bootstrap.sh), for tests with generated Apache Thrift peers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Tuple

THRIFT_COMPILER = "/usr/bin/thrift"


def compile_apache(idl: str, folder: Path, package: str) -> Iterator[Tuple[Any, Any]]:
    """The IDL compiled by the Apache Thrift compiler into ``folder``, imported as ``package``:
    yields (the service module, its ttypes), and unloads them afterwards."""
    src = folder / ("%s.thrift" % package)
    src.write_text(Path(idl).read_text().replace("namespace py demo", "namespace py %s" % package))
    out = folder / "gen"
    out.mkdir()
    subprocess.run([THRIFT_COMPILER, "--gen", "py", "-out", str(out), str(src)], check=True,
                   capture_output=True, timeout=60)
    sys.path.insert(0, str(out))
    try:
        service = __import__("%s.Calculator" % package, fromlist=["Calculator"])
        ttypes = __import__("%s.ttypes" % package, fromlist=["ttypes"])
        yield service, ttypes
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]
        shutil.rmtree(out, ignore_errors=True)
