"""Create the MySQL schema and register appkeys: ``python tests/init_db.py --appkey demo.calc``."""

import argparse

from thriftprobe import config
from thriftprobe.stores import appkeys, mysql


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None, help="config file (default: the usual lookup)")
    parser.add_argument("--env", default=None, help="environment (default: the usual rules)")
    parser.add_argument("--appkey", action="append", default=[], help="appkey to register (repeatable)")
    args = parser.parse_args()
    cfg = config.load(args.config, args.env)
    mysql.create_schema(cfg.mysql)
    for key in args.appkey:
        added = appkeys.add_appkey(cfg.mysql, key, owner="demo", description="registered by tests/init_db.py")
        print("appkey %s %s in %s" % (key, "registered" if added else "already registered", cfg.mysql.describe()))


if __name__ == "__main__":
    main()
