"""Where the local servers for the demo, the tests and the benchmark listen.

The same variables and defaults as tests/services.sh, which starts them and writes the demo's
config to ``$THRIFTPROBE_STATE_DIR/config.yml``: set a port once (for example
``THRIFTPROBE_MYSQL_PORT=13307 bash tests/run.sh``) and the servers, the schema, the demo and
the tests all use it.
"""

from __future__ import annotations

import os
from pathlib import Path

HOST = "127.0.0.1"
ZK_PORT = int(os.environ.get("THRIFTPROBE_ZK_PORT", "2181"))
REDIS_PORT = int(os.environ.get("THRIFTPROBE_REDIS_PORT", "6379"))
CLUSTER_PORTS = [int(p) for p in os.environ.get("THRIFTPROBE_REDIS_CLUSTER_PORTS", "7001 7002 7003").split()]
CLUSTER_PORT = CLUSTER_PORTS[0]
MYSQL_PORT = int(os.environ.get("THRIFTPROBE_MYSQL_PORT", "3306"))
ZK = "%s:%d" % (HOST, ZK_PORT)
STATE_DIR = Path(os.environ.get("THRIFTPROBE_STATE_DIR", "/tmp/thriftprobe-services"))
DEMO_CONFIG = STATE_DIR / "config.yml"
