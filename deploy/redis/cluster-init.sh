#!/bin/sh
# One-shot init of the Redis Cluster in docker-compose.cluster.yml:
#   cluster-init.sh HOST:PORT HOST:PORT HOST:PORT ...
# On the first `up`, joins the empty nodes into one cluster of primaries (the
# 16384 slots split evenly). On every later `up` the cluster exists: the nodes
# are introduced again by their current addresses instead, since recreated
# containers may have new ones (a CLUSTER MEET of a node already known only
# updates its address). Either way, exits 0 once every node reports
# cluster_state:ok, 1 after 60 s.
set -eu

[ "$#" -ge 3 ] || { echo "usage: $0 HOST:PORT HOST:PORT HOST:PORT ..." >&2; exit 2; }

cli() {  # cli HOST:PORT ARGS...: redis-cli against one node
    node=$1
    shift
    redis-cli -h "${node%:*}" -p "${node##*:}" "$@"
}

info_field() {  # info_field HOST:PORT FIELD: one field of CLUSTER INFO
    cli "$1" cluster info | tr -d '\r' | sed -n "s/^$2://p"
}

first=$1
if [ "$(info_field "$first" cluster_slots_assigned)" = "0" ]; then
    echo "creating the cluster: $*"
    redis-cli --cluster create "$@" --cluster-yes
else
    echo "cluster exists; introducing the nodes again by their current addresses"
    for node in "$@"; do
        [ "$node" = "$first" ] && continue
        addr=$(getent hosts "${node%:*}" | awk '{ print $1; exit }')
        [ -n "$addr" ] || { echo "cannot resolve ${node%:*}" >&2; exit 1; }
        cli "$first" cluster meet "$addr" "${node##*:}" >/dev/null
    done
fi

tries=0
while :; do
    ok=1
    for node in "$@"; do
        [ "$(info_field "$node" cluster_state)" = "ok" ] || ok=0
    done
    [ "$ok" = 1 ] && break
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
        echo "the cluster is not ok after 60 s:" >&2
        cli "$first" cluster nodes >&2
        exit 1
    fi
    sleep 1
done
echo "cluster ok: $(info_field "$first" cluster_size) primaries serving slots"
