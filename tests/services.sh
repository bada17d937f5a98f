#!/usr/bin/env bash
# Local backing services for the thriftprobe test suite.
#
#   bash tests/services.sh start  [SERVICE...]   install (apt, only if missing) and start
#   bash tests/services.sh stop   [SERVICE...]   stop what THIS script started (pid files)
#   bash tests/services.sh status [SERVICE...]   one line per service; exit 3 if any is down
#   bash tests/services.sh clean                 stop, then delete the state directory
#
# SERVICE is one of: zookeeper redis redis-cluster mariadb prometheus (default: all of them).
#
# Everything listens on 127.0.0.1 only.  A service that already answers on its
# port (for example a Redis or MariaDB the machine runs anyway) is used as is and
# never stopped by this script.  `start` is idempotent: a second run only probes.
#
# Environment:
#   THRIFTPROBE_STATE_DIR            state, data, logs, pid files  (/tmp/thriftprobe-services)
#   THRIFTPROBE_ZK_PORT              ZooKeeper client port         (2181)
#   THRIFTPROBE_REDIS_PORT           standalone Redis port         (6379)
#   THRIFTPROBE_REDIS_CLUSTER_PORTS  Redis Cluster master ports    ("7001 7002 7003")
#   THRIFTPROBE_MYSQL_PORT           MariaDB port                  (3306)
#   THRIFTPROBE_PROMETHEUS_PORT      Prometheus HTTP port          (19990)
#   THRIFTPROBE_START_TIMEOUT        seconds to wait for a service (30; MariaDB gets twice that)
#   THRIFTPROBE_PYTHON               Python that creates the schema + demo appkey (python3)
#
# `start` writes $THRIFTPROBE_STATE_DIR/config.yml (env dev) with these ports: the demo uses it,
# the schema and the demo appkey are created through it, and the tests read the same variables
# (tests/local_servers.py). A port taken by a server that refuses us (MySQL with a root
# password, Redis with AUTH, not-ZooKeeper) stops the script with the variable to set.

set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${THRIFTPROBE_STATE_DIR:-/tmp/thriftprobe-services}"
ZK_PORT="${THRIFTPROBE_ZK_PORT:-2181}"
REDIS_PORT="${THRIFTPROBE_REDIS_PORT:-6379}"
read -r -a CLUSTER_PORTS <<<"${THRIFTPROBE_REDIS_CLUSTER_PORTS:-7001 7002 7003}"
MYSQL_PORT="${THRIFTPROBE_MYSQL_PORT:-3306}"
PROM_PORT="${THRIFTPROBE_PROMETHEUS_PORT:-19990}"
TIMEOUT="${THRIFTPROBE_START_TIMEOUT:-30}"
HOST=127.0.0.1
ALL_SERVICES=(zookeeper redis redis-cluster mariadb prometheus)

ZK_JAR=/usr/share/java/zookeeper.jar
# zookeeper.jar's manifest Class-Path pulls in its dependencies (netty, jetty,
# jackson, slf4j-api, zookeeper-jute, ...).  slf4j-api alone has no binding, so
# the server would log nothing at all: add slf4j-simple (from libslf4j-java, a
# dependency of libzookeeper-java) to get the log on stderr, i.e. in our log file.
ZK_LOG_BINDING=/usr/share/java/slf4j-simple.jar

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

log() { printf '[services] %s\n' "$*" >&2; }

die() {
    log "ERROR: $*"
    exit 1
}

# Print the last lines of a log file to stderr (used before giving up).
show_log() {
    local file="$1"
    if [[ -s "$file" ]]; then
        log "---- last lines of $file ----"
        tail -n 30 "$file" >&2 || true
        log "---- end of $file ----"
    fi
}

# await_start PID PIDFILE LOGFILE TIMEOUT DESCRIPTION COMMAND...
# For a server just started as PID: record it in PIDFILE and wait (wait_for) until COMMAND
# succeeds; if it does not, show the end of LOGFILE and give up.
await_start() {
    local pid="$1" pidfile="$2" logfile="$3" timeout="$4" what="$5"
    shift 5
    echo "$pid" >"$pidfile"
    if ! wait_for --pid "$pid" "$timeout" "$what" "$@"; then
        show_log "$logfile"
        die "$what did not start"
    fi
}

# wait_for [--pid PID] [--pidfile FILE] TIMEOUT DESCRIPTION COMMAND...
# Poll COMMAND until it succeeds.  Returns 1 when TIMEOUT seconds have passed,
# or early when the process we started (PID, or the one named in FILE) died.
wait_for() {
    local pid="" pidfile=""
    while [[ "$1" == --* ]]; do
        case "$1" in
            --pid) pid="$2"; shift 2 ;;
            --pidfile) pidfile="$2"; shift 2 ;;
            *) die "wait_for: unknown option $1" ;;
        esac
    done
    local timeout="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + timeout))
    while true; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "$what: the process (pid $pid) exited"
            return 1
        fi
        if [[ -n "$pidfile" && -s "$pidfile" ]]; then
            local p
            p="$(cat "$pidfile" 2>/dev/null || true)"
            if [[ -n "$p" ]] && ! kill -0 "$p" 2>/dev/null; then
                log "$what: the process (pid $p) exited"
                return 1
            fi
        fi
        if ((SECONDS >= deadline)); then
            log "$what: not ready after ${timeout}s"
            return 1
        fi
        sleep 0.2
    done
}

# pid_alive PIDFILE PATTERN: the pid in PIDFILE runs and its command line
# contains PATTERN (so a recycled pid is not mistaken for our server).
pid_alive() {
    local pidfile="$1" pattern="$2" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)" == *"$pattern"* ]]
}

# stop_pidfile NAME PIDFILE PATTERN [GRACE_SECONDS]
stop_pidfile() {
    local name="$1" pidfile="$2" pattern="$3" grace="${4:-20}" pid
    if ! pid_alive "$pidfile" "$pattern"; then
        rm -f "$pidfile"
        return 1
    fi
    pid="$(cat "$pidfile")"
    log "$name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name: still running after ${grace}s, sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
    return 0
}

# Something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    timeout 2 bash -c ">/dev/tcp/$HOST/$1" 2>/dev/null
}

# The client programs of the installed MariaDB/MySQL, whichever names exist.
first_command() {
    local c
    for c in "$@"; do
        if command -v "$c" >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

APT_UPDATED=0
# apt_install PACKAGE...: install with apt-get; `apt-get update` at most once.
apt_install() {
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to install: $*"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: $*"
    # Keep the packages' maintainer scripts from starting system-wide services
    # (that would grab our ports): a policy-rc.d answering 101 tells
    # invoke-rc.d not to start anything.  Only ours is removed afterwards.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || rc=$?
        APT_UPDATED=1
    fi
    if ((rc == 0)); then
        log "apt-get install $*"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "$@" >&2 </dev/null || rc=$?
    fi
    if ((created_policy)); then
        "${sudo[@]}" rm -f "$policy"
    fi
    ((rc == 0)) || die "apt-get failed ($rc) installing: $*"
}

# ---------------------------------------------------------------------------
# ZooKeeper (standalone, Debian package `zookeeper`)
# ---------------------------------------------------------------------------

ZK_DIR="$STATE/zk"
ZK_PID="$ZK_DIR/zookeeper.pid"
ZK_LOG="$ZK_DIR/zookeeper.log"
ZK_CFG="$ZK_DIR/zoo.cfg"

# `srvr` answers with "Mode: standalone" only once the server is serving
# (`ruok` says imok earlier than that).
zk_ready() {
    local out
    out="$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf srvr >&3
        cat <&3' _ "$HOST" "$ZK_PORT" 2>/dev/null)" || true
    [[ "$out" == *"Mode:"* ]]
}

zookeeper_start() {
    local addr="$HOST:$ZK_PORT"
    if zk_ready; then
        log "zookeeper $addr: already running"
        return 0
    fi
    mkdir -p "$ZK_DIR/data"
    if pid_alive "$ZK_PID" QuorumPeerMain; then
        log "zookeeper $addr: started earlier, waiting for it"
        wait_for --pidfile "$ZK_PID" "$TIMEOUT" "zookeeper $addr" zk_ready && return 0
        show_log "$ZK_LOG"
        die "zookeeper $addr did not become ready"
    fi
    if port_open "$ZK_PORT"; then
        die "zookeeper: port $ZK_PORT is taken by something that does not answer srvr;" \
            "set THRIFTPROBE_ZK_PORT to a free port and this script starts its own ZooKeeper there"
    fi

    command -v java >/dev/null 2>&1 || apt_install default-jre-headless
    [[ -f "$ZK_JAR" ]] || apt_install zookeeper
    [[ -f "$ZK_JAR" ]] || die "zookeeper: $ZK_JAR missing after installing the package"

    cat >"$ZK_CFG" <<EOF
# written by tests/services.sh
tickTime=500
initLimit=10
syncLimit=5
dataDir=$ZK_DIR/data
clientPort=$ZK_PORT
clientPortAddress=$HOST
4lw.commands.whitelist=*
admin.enableServer=false
minSessionTimeout=1000
maxSessionTimeout=60000
EOF
    local cp="/etc/zookeeper/conf:$ZK_JAR"
    [[ -f "$ZK_LOG_BINDING" ]] && cp="$cp:$ZK_LOG_BINDING"

    log "zookeeper $addr: starting (log $ZK_LOG)"
    (
        cd "$ZK_DIR"
        exec setsid nohup java -Xmx128m -Xms16m -XX:+UseSerialGC \
            -Dzookeeper.log.dir="$ZK_DIR" \
            -Dorg.slf4j.simpleLogger.showDateTime=true \
            -Dorg.slf4j.simpleLogger.dateTimeFormat="yyyy-MM-dd HH:mm:ss.SSS" \
            -cp "$cp" org.apache.zookeeper.server.quorum.QuorumPeerMain "$ZK_CFG" \
            </dev/null >"$ZK_LOG" 2>&1 9>&-
    ) &
    local pid=$!
    await_start "$pid" "$ZK_PID" "$ZK_LOG" "$TIMEOUT" "zookeeper $addr" zk_ready
    log "zookeeper $addr: up (pid $pid)"
}

zookeeper_stop() {
    stop_pidfile "zookeeper $HOST:$ZK_PORT" "$ZK_PID" QuorumPeerMain ||
        log "zookeeper $HOST:$ZK_PORT: not started by this script, leaving it"
}

zookeeper_status() {
    print_status zookeeper "$HOST:$ZK_PORT" zk_ready "$ZK_PID" QuorumPeerMain
}

# ---------------------------------------------------------------------------
# Redis, standalone and cluster (Debian package `redis-server`)
# ---------------------------------------------------------------------------

# redis-cli (package redis-tools) is needed for every probe, redis-server only
# when this script has to start a server.
ensure_redis_cli() {
    command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
}

ensure_redis_server() {
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-tools
}

rcli() {
    local port="$1"
    shift
    timeout 10 redis-cli -h "$HOST" -p "$port" "$@"
}

redis_ping() {
    [[ "$(rcli "$1" ping 2>/dev/null)" == PONG ]]
}

# refuse_foreign_redis PORT VARIABLE: die, naming VARIABLE, when PORT is taken by a server that
# does not let us in (a Redis with a password answers PING with NOAUTH) or is not Redis.
refuse_foreign_redis() {
    local port="$1" variable="$2" answer
    port_open "$port" || return 0
    answer="$(rcli "$port" ping 2>&1 || true)"
    if [[ "$answer" == *NOAUTH* || "$answer" == *WRONGPASS* ]]; then
        die "redis: $HOST:$port answers but requires a password (AUTH); the tests need a Redis" \
            "without one: set $variable to a free port and this script starts its own Redis there"
    fi
    die "redis: port $port is taken by something that does not answer PING ($answer);" \
        "set $variable to a free port and this script starts its own Redis there"
}

# start_redis_server PORT DIR [EXTRA ARGS...]: daemonised redis-server, pid file in DIR.
start_redis_server() {
    local port="$1" dir="$2"
    shift 2
    mkdir -p "$dir"
    rm -f "$dir/redis.pid"
    redis-server --daemonize yes --bind "$HOST" --port "$port" \
        --save "" --appendonly no --dir "$dir" \
        --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" "$@" 9>&- ||
        die "redis $HOST:$port: redis-server refused to start (see $dir/redis.log)"
}

REDIS_DIR="$STATE/redis/$REDIS_PORT"

redis_start() {
    local addr="$HOST:$REDIS_PORT"
    ensure_redis_cli
    if redis_ping "$REDIS_PORT"; then
        log "redis $addr: already running"
        return 0
    fi
    refuse_foreign_redis "$REDIS_PORT" THRIFTPROBE_REDIS_PORT
    ensure_redis_server
    log "redis $addr: starting (log $REDIS_DIR/redis.log)"
    start_redis_server "$REDIS_PORT" "$REDIS_DIR"
    if ! wait_for --pidfile "$REDIS_DIR/redis.pid" "$TIMEOUT" "redis $addr" redis_ping "$REDIS_PORT"; then
        show_log "$REDIS_DIR/redis.log"
        die "redis $addr did not start"
    fi
    log "redis $addr: up"
}

redis_stop() {
    stop_pidfile "redis $HOST:$REDIS_PORT" "$REDIS_DIR/redis.pid" redis-server ||
        log "redis $HOST:$REDIS_PORT: not started by this script, leaving it"
}

redis_status() {
    print_status redis "$HOST:$REDIS_PORT" redis_ping "$REDIS_DIR/redis.pid" redis-server "$REDIS_PORT"
}

cluster_dir() { echo "$STATE/redis-cluster/$1"; }

# cluster_field PORT FIELD: one value of CLUSTER INFO (empty if unavailable).
cluster_field() {
    local info line
    info="$(rcli "$1" cluster info 2>/dev/null | tr -d '\r')" || return 0
    while IFS= read -r line; do
        if [[ "$line" == "$2:"* ]]; then
            echo "${line#*:}"
            return 0
        fi
    done <<<"$info"
}

# All nodes: cluster_state ok, every slot served, every node known.
cluster_ok() {
    local port n="${#CLUSTER_PORTS[@]}"
    for port in "${CLUSTER_PORTS[@]}"; do
        [[ "$(cluster_field "$port" cluster_state)" == ok ]] || return 1
        [[ "$(cluster_field "$port" cluster_slots_ok)" == 16384 ]] || return 1
        [[ "$(cluster_field "$port" cluster_known_nodes)" == "$n" ]] || return 1
    done
}

# The nodes kept their cluster config (nodes.conf) from an earlier run: they
# know each other and all slots are assigned, so they only need to reconnect.
cluster_configured() {
    local port n="${#CLUSTER_PORTS[@]}"
    for port in "${CLUSTER_PORTS[@]}"; do
        [[ "$(cluster_field "$port" cluster_slots_assigned)" == 16384 ]] || return 1
        [[ "$(cluster_field "$port" cluster_known_nodes)" == "$n" ]] || return 1
    done
}

cluster_create() {
    local nodes=() port
    for port in "${CLUSTER_PORTS[@]}"; do
        nodes+=("$HOST:$port")
    done
    timeout 60 redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
        </dev/null >"$STATE/redis-cluster/create.log" 2>&1
}

cluster_reset() {
    local port
    for port in "${CLUSTER_PORTS[@]}"; do
        log "redis-cluster: FLUSHALL + CLUSTER RESET HARD on $HOST:$port"
        rcli "$port" flushall >/dev/null 2>&1 || true
        rcli "$port" cluster reset hard >/dev/null ||
            die "redis-cluster: CLUSTER RESET HARD failed on $HOST:$port"
        rcli "$port" flushall >/dev/null 2>&1 || true
    done
}

redis_cluster_start() {
    local port dir addrs="$HOST:${CLUSTER_PORTS[*]}"
    addrs="${addrs// /,}"
    ((${#CLUSTER_PORTS[@]} >= 3)) || die "redis-cluster: needs at least 3 ports, got: ${CLUSTER_PORTS[*]}"
    mkdir -p "$STATE/redis-cluster"
    ensure_redis_cli

    local started=0
    for port in "${CLUSTER_PORTS[@]}"; do
        dir="$(cluster_dir "$port")"
        if redis_ping "$port"; then
            continue
        fi
        refuse_foreign_redis "$port" THRIFTPROBE_REDIS_CLUSTER_PORTS
        ensure_redis_server
        log "redis-cluster $HOST:$port: starting (log $dir/redis.log)"
        start_redis_server "$port" "$dir" \
            --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
            --cluster-node-timeout 2000
        started=1
    done
    for port in "${CLUSTER_PORTS[@]}"; do
        dir="$(cluster_dir "$port")"
        if ! wait_for --pidfile "$dir/redis.pid" "$TIMEOUT" "redis-cluster $HOST:$port" redis_ping "$port"; then
            show_log "$dir/redis.log"
            die "redis-cluster $HOST:$port did not start"
        fi
        if [[ "$(rcli "$port" cluster info 2>&1)" == *"cluster support disabled"* ]]; then
            die "redis-cluster: $HOST:$port is a Redis without cluster mode (not ours?)"
        fi
    done

    if cluster_ok; then
        if ((started)); then
            log "redis-cluster $addrs: up"
        else
            log "redis-cluster $addrs: already running"
        fi
        return 0
    fi

    if cluster_configured; then
        # Restarted nodes with their old nodes.conf: give them time to reconnect.
        log "redis-cluster: nodes know each other, waiting for cluster_state:ok"
        if wait_for "$TIMEOUT" "redis-cluster $addrs" cluster_ok; then
            log "redis-cluster $addrs: up"
            return 0
        fi
        log "redis-cluster: stale cluster state did not recover, recreating it"
    fi

    log "redis-cluster: creating cluster on $addrs"
    if ! cluster_create; then
        # Typically "[ERR] Node ... is not empty": old keys or an old cluster config.
        local why
        why="$(sed 's/\x1b\[[0-9;]*m//g' "$STATE/redis-cluster/create.log" | grep -m1 -F '[ERR]')" || why="see create.log"
        log "redis-cluster: create failed (${why}), resetting the nodes"
        cluster_reset
        if ! cluster_create; then
            show_log "$STATE/redis-cluster/create.log"
            die "redis-cluster: redis-cli --cluster create failed"
        fi
    fi
    if ! wait_for "$TIMEOUT" "redis-cluster $addrs" cluster_ok; then
        for port in "${CLUSTER_PORTS[@]}"; do
            log "cluster info of $HOST:$port: $(rcli "$port" cluster info 2>&1 | tr -d '\r' | head -n 7 | tr '\n' ' ')"
        done
        die "redis-cluster $addrs did not reach cluster_state:ok"
    fi
    log "redis-cluster $addrs: up"
}

redis_cluster_stop() {
    local port
    for port in "${CLUSTER_PORTS[@]}"; do
        stop_pidfile "redis-cluster $HOST:$port" "$(cluster_dir "$port")/redis.pid" redis-server ||
            log "redis-cluster $HOST:$port: not started by this script, leaving it"
    done
}

redis_cluster_status() {
    local port
    for port in "${CLUSTER_PORTS[@]}"; do
        print_status redis-cluster "$HOST:$port" redis_ping "$(cluster_dir "$port")/redis.pid" redis-server "$port"
    done
    if cluster_ok; then
        printf '%-14s %-5s %s\n' redis-cluster up "cluster_state:ok"
    else
        printf '%-14s %-5s %s\n' redis-cluster down "cluster_state:$(cluster_field "${CLUSTER_PORTS[0]}" cluster_state)"
        STATUS_RC=3
    fi
}

# ---------------------------------------------------------------------------
# MariaDB (Debian package `mariadb-server`), root with an empty password
# ---------------------------------------------------------------------------

MYSQL_DIR="$STATE/mysql"
MYSQL_DATA="$MYSQL_DIR/data"
MYSQL_SOCK="$MYSQL_DIR/mysqld.sock"
MYSQL_PID="$MYSQL_DIR/mysqld.pid"
MYSQL_LOG="$MYSQL_DIR/mysqld.log"

mysql_client() { first_command mariadb mysql; }
mysql_admin() { first_command mariadb-admin mysqladmin; }

# The server answers at all (mysqladmin ping is "alive" even on Access denied).
mysql_alive() {
    local admin
    admin="$(mysql_admin)" || return 1
    timeout 10 "$admin" --no-defaults --protocol=tcp -h"$HOST" -P"$MYSQL_PORT" -uroot \
        --connect-timeout=2 ping >/dev/null 2>&1
}

# root with an empty password can log in over TCP.
mysql_login_ok() {
    local client
    client="$(mysql_client)" || return 1
    timeout 10 "$client" --no-defaults --protocol=tcp -h"$HOST" -P"$MYSQL_PORT" -uroot \
        --connect-timeout=2 -e 'SELECT 1' >/dev/null 2>&1
}

# Our own server only: let root in over TCP with an empty password (a fresh
# datadir may have root@localhost on unix_socket auth only).
mysql_fix_root() {
    local client
    client="$(mysql_client)" || die "mariadb: no mariadb/mysql client found"
    log "mariadb: granting root@localhost and root@127.0.0.1 an empty password (via $MYSQL_SOCK)"
    "$client" --no-defaults --protocol=socket --socket="$MYSQL_SOCK" -uroot <<'SQL'
ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
FLUSH PRIVILEGES;
SQL
}

mariadb_start() {
    local addr="$HOST:$MYSQL_PORT"
    if ! mysql_client >/dev/null || ! mysql_admin >/dev/null; then
        apt_install mariadb-client
    fi
    if mysql_login_ok; then
        log "mariadb $addr: already running"
        return 0
    fi
    mkdir -p "$MYSQL_DIR"
    if pid_alive "$MYSQL_PID" "--datadir=$MYSQL_DATA"; then
        # Ours, but root cannot log in (yet): wait for it, then fix root.
        log "mariadb $addr: started earlier, waiting for it"
        if ! wait_for --pidfile "$MYSQL_PID" $((TIMEOUT * 2)) "mariadb $addr" mysql_alive; then
            show_log "$MYSQL_LOG"
            die "mariadb $addr did not become ready"
        fi
        mysql_login_ok || mysql_fix_root
        mysql_login_ok || die "mariadb $addr: root cannot log in with an empty password"
        log "mariadb $addr: up"
        return 0
    fi
    if mysql_alive || port_open "$MYSQL_PORT"; then
        die "mariadb: something answers on $addr but root with an empty password cannot log in (not ours," \
            "not touching it): set THRIFTPROBE_MYSQL_PORT to a free port and this script starts its own MariaDB there"
    fi

    local server
    server="$(first_command mariadbd mysqld)" || true
    if [[ -z "$server" ]] || ! command -v mariadb-install-db >/dev/null 2>&1 || ! mysql_client >/dev/null; then
        apt_install mariadb-server mariadb-client
        server="$(first_command mariadbd mysqld)" || die "mariadb: no mariadbd after installing mariadb-server"
    fi

    if [[ ! -d "$MYSQL_DATA/mysql" ]]; then
        log "mariadb: initialising $MYSQL_DATA"
        rm -rf "$MYSQL_DATA"
        mkdir -p "$MYSQL_DATA"
        if ! mariadb-install-db --no-defaults --user=root --datadir="$MYSQL_DATA" \
            --auth-root-authentication-method=normal --skip-test-db --skip-name-resolve \
            >"$MYSQL_DIR/install-db.log" 2>&1 </dev/null; then
            show_log "$MYSQL_DIR/install-db.log"
            rm -rf "$MYSQL_DATA"
            die "mariadb: mariadb-install-db failed"
        fi
    fi

    log "mariadb $addr: starting (log $MYSQL_LOG)"
    rm -f "$MYSQL_SOCK" "$MYSQL_PID"
    # --no-defaults has to be the very first option.
    setsid nohup "$server" --no-defaults --user=root --datadir="$MYSQL_DATA" \
        --socket="$MYSQL_SOCK" --pid-file="$MYSQL_PID" \
        --port="$MYSQL_PORT" --bind-address="$HOST" \
        --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
        --skip-log-bin --innodb-buffer-pool-size=64M \
        </dev/null >>"$MYSQL_LOG" 2>&1 9>&- &
    local pid=$!
    await_start "$pid" "$MYSQL_PID" "$MYSQL_LOG" $((TIMEOUT * 2)) "mariadb $addr" mysql_alive
    mysql_login_ok || mysql_fix_root
    mysql_login_ok || die "mariadb $addr: root cannot log in with an empty password"
    log "mariadb $addr: up (pid $pid)"
}

mariadb_stop() {
    stop_pidfile "mariadb $HOST:$MYSQL_PORT" "$MYSQL_PID" "--datadir=$MYSQL_DATA" 60 ||
        log "mariadb $HOST:$MYSQL_PORT: not started by this script, leaving it"
}

mariadb_status() {
    print_status mariadb "$HOST:$MYSQL_PORT" mysql_login_ok "$MYSQL_PID" "--datadir=$MYSQL_DATA"
}

# ---------------------------------------------------------------------------
# Prometheus (Debian package `prometheus`): discovers the providers of the test and demo
# environments in ZooKeeper (serverset_sd_configs) and scrapes their /metrics endpoints
# ---------------------------------------------------------------------------

PROM_DIR="$STATE/prometheus"
PROM_PID="$PROM_DIR/prometheus.pid"
PROM_LOG="$PROM_DIR/prometheus.log"
PROM_CFG="$PROM_DIR/prometheus.yml"
# The whole /services tree (every environment: the tests', the demo's), not /services/<env>
# paths: Prometheus' ZooKeeper tree cache stalls for 10 s whenever its path is deleted, and the
# tests delete /services/test at the start of every session.
PROM_PATHS=(/services)

# http_status PORT PATH: the status code 127.0.0.1:PORT answers GET PATH with (bash only, no curl).
http_status() {
    local out
    out="$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$3" "$1" >&3
        head -n 1 <&3' _ "$HOST" "$1" "$2" 2>/dev/null)" || return 1
    out="${out#HTTP/* }"
    echo "${out%% *}"
}

prometheus_ready() {
    [[ "$(http_status "$PROM_PORT" /-/ready)" == 200 ]]
}

# The scrape config: each znode under /services that advertises a serverset endpoint
# named "metrics" is a target at that endpoint. Providers of one process share their endpoint;
# targets with the same address are one target, so nothing is scraped twice.
prometheus_config() {
    local paths="" path
    for path in "${PROM_PATHS[@]}"; do
        paths="$paths\"$path\", "
    done
    cat <<EOF
# written by tests/services.sh on every start
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: thriftprobe
    serverset_sd_configs:
      - servers: ["$HOST:$ZK_PORT"]
        paths: [${paths%, }]
        timeout: 10s
    relabel_configs:
      - source_labels: [__meta_serverset_endpoint_port_metrics]
        regex: .+
        action: keep
      - source_labels: [__meta_serverset_endpoint_host_metrics, __meta_serverset_endpoint_port_metrics]
        regex: (.+);(.+)
        target_label: __address__
        replacement: \$1:\$2
EOF
}

prometheus_start() {
    local addr="$HOST:$PROM_PORT"
    mkdir -p "$PROM_DIR/data"
    prometheus_config >"$PROM_CFG.tmp"
    if prometheus_ready; then
        if pid_alive "$PROM_PID" "--config.file=$PROM_CFG" && ! cmp -s "$PROM_CFG.tmp" "$PROM_CFG"; then
            mv "$PROM_CFG.tmp" "$PROM_CFG"
            log "prometheus $addr: already running, reloading its changed config"
            kill -HUP "$(cat "$PROM_PID")"
        else
            rm -f "$PROM_CFG.tmp"
            log "prometheus $addr: already running"
        fi
        return 0
    fi
    mv "$PROM_CFG.tmp" "$PROM_CFG"
    if pid_alive "$PROM_PID" "--config.file=$PROM_CFG"; then
        log "prometheus $addr: started earlier, waiting for it"
        wait_for --pidfile "$PROM_PID" "$TIMEOUT" "prometheus $addr" prometheus_ready && return 0
        show_log "$PROM_LOG"
        die "prometheus $addr did not become ready"
    fi
    if port_open "$PROM_PORT"; then
        die "prometheus: port $PROM_PORT is taken by something that does not answer /-/ready;" \
            "set THRIFTPROBE_PROMETHEUS_PORT to a free port and this script starts its own Prometheus there"
    fi
    command -v prometheus >/dev/null 2>&1 || apt_install prometheus
    command -v prometheus >/dev/null 2>&1 || die "prometheus: no prometheus after installing the package"

    log "prometheus $addr: starting (log $PROM_LOG)"
    (
        cd "$PROM_DIR"
        exec setsid nohup prometheus --config.file="$PROM_CFG" \
            --storage.tsdb.path="$PROM_DIR/data" --storage.tsdb.retention.time=2h \
            --web.listen-address="$addr" \
            </dev/null >"$PROM_LOG" 2>&1 9>&-
    ) &
    local pid=$!
    await_start "$pid" "$PROM_PID" "$PROM_LOG" "$TIMEOUT" "prometheus $addr" prometheus_ready
    log "prometheus $addr: up (pid $pid)"
}

prometheus_stop() {
    stop_pidfile "prometheus $HOST:$PROM_PORT" "$PROM_PID" "--config.file=$PROM_CFG" ||
        log "prometheus $HOST:$PROM_PORT: not started by this script, leaving it"
}

prometheus_status() {
    print_status prometheus "$HOST:$PROM_PORT" prometheus_ready "$PROM_PID" "--config.file=$PROM_CFG"
}

# Create the schema and the demo appkey with the package's own code (idempotent).
# Needs a Python that can import thriftprobe (THRIFTPROBE_PYTHON, default python3).
apply_schema() {
    local py="${THRIFTPROBE_PYTHON:-python3}"
    local root
    root="$(cd "$SCRIPT_DIR/.." && pwd)"
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$py" -c 'import thriftprobe' 2>/dev/null; then
        log "schema: $py cannot import thriftprobe yet (pip install -e .), skipping"
        return 0
    fi
    log "schema: creating it in $HOST:$MYSQL_PORT with the demo appkey"
    (cd "$root" && "$py" tests/init_db.py --config "$DEMO_CONFIG" --env dev --appkey demo.calc) ||
        die "schema: tests/init_db.py failed"
}

# The demo's config (env dev), with the ports this script uses: written on every start, so a
# port set in the environment reaches everything that reads it.
DEMO_CONFIG="$STATE/config.yml"

write_config() {
    mkdir -p "$STATE"
    cat >"$DEMO_CONFIG.tmp" <<EOF
# Written by tests/services.sh on every start: the servers it manages, on the ports it used.
mysql:
  dev: {host: $HOST, port: $MYSQL_PORT, username: root, password: "", database: thriftprobe}
redis:
  dev: {host: $HOST, port: $REDIS_PORT, password: "", cluster: 0}
zkserver:
  dev: {host: $HOST, port: $ZK_PORT, session_timeout: 4000}
console:
  dev: {username: admin, password: "\${THRIFTPROBE_CONSOLE_PASSWORD}"}
EOF
    mv "$DEMO_CONFIG.tmp" "$DEMO_CONFIG"
}

# ---------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------

STATUS_RC=0

# print_status NAME ADDR PROBE PIDFILE PATTERN [PROBE ARG]
print_status() {
    local name="$1" addr="$2" probe="$3" pidfile="$4" pattern="$5" state owner
    shift 5
    if "$probe" "$@" >/dev/null 2>&1; then
        state=up
    else
        state=down
        STATUS_RC=3
    fi
    if pid_alive "$pidfile" "$pattern"; then
        owner="started by services.sh, pid $(cat "$pidfile")"
    elif [[ $state == up ]]; then
        owner="external"
    else
        owner="-"
    fi
    printf '%-14s %-5s %-22s (%s)\n' "$name" "$state" "$addr" "$owner"
}

service_fn() {
    case "$1" in
        zookeeper | zk) echo zookeeper ;;
        redis) echo redis ;;
        redis-cluster | cluster) echo redis_cluster ;;
        mariadb | mysql) echo mariadb ;;
        prometheus) echo prometheus ;;
        *) die "unknown service '$1' (expected: ${ALL_SERVICES[*]})" ;;
    esac
}

take_lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another services.sh holds $STATE/.lock"
}

usage() {
    sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

main() {
    local verb="${1:-}"
    [[ -n "$verb" ]] || usage
    shift
    local services=("$@") fns=() s
    ((${#services[@]})) || services=("${ALL_SERVICES[@]}")
    for s in "${services[@]}"; do
        fns+=("$(service_fn "$s")")
    done

    case "$verb" in
        start)
            take_lock
            local t0=$SECONDS fn
            write_config
            for fn in "${fns[@]}"; do
                "${fn}_start"
            done
            if [[ " ${fns[*]} " == *" mariadb "* ]]; then
                apply_schema
            fi
            log "all requested services are up ($((SECONDS - t0))s; state in $STATE; config $DEMO_CONFIG)"
            ;;
        stop)
            take_lock
            local i
            for ((i = ${#fns[@]} - 1; i >= 0; i--)); do
                "${fns[$i]}_stop"
            done
            ;;
        status)
            local fn
            for fn in "${fns[@]}"; do
                "${fn}_status"
            done
            return "$STATUS_RC"
            ;;
        clean)
            take_lock
            local fn
            for fn in prometheus mariadb redis_cluster redis zookeeper; do
                "${fn}_stop"
            done
            log "removing $STATE"
            rm -rf "$STATE"
            ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
