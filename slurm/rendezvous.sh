# Sourced by common.sh: the address of the allocation's first node, where rank 0 hosts the rendezvous.
# SLURM's node names need not resolve as host names (NodeAddr may differ from NodeName), so the node's own
# NodeAddr is asked for first. A multi-node job whose first node cannot be reached by name is an error:
# falling back to 127.0.0.1 there would make every node wait for a rank 0 of its own.
rendezvous_host() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$first" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    addr=${addr:-$first}
    if getent hosts "$addr" >/dev/null 2>&1; then
        echo "$addr"
    elif [ "${SLURM_NNODES:-1}" -le 1 ]; then
        echo "note: node $first ($addr) does not resolve; using 127.0.0.1 (single-node allocation)" >&2
        echo 127.0.0.1
    else
        echo "error: the first node of this ${SLURM_NNODES}-node allocation, $first (NodeAddr $addr), does not" \
             "resolve as a host name here, so the other nodes cannot reach rank 0; add it to DNS or /etc/hosts" >&2
        return 1
    fi
}
