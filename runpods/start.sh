#!/usr/bin/env bash
# Start a Ray head or join one as a worker on a RunPods pod running the halldyll-ray image
# (halldyll-ray-gpu on GPU pods), against external PostgreSQL and Redis. On the head, apply the
# migrations and deploy the cluster's Serve config (runpods/serve_config.yaml, generated from
# serve_config.yaml by scripts/render_kuberay.py). See docs/deployment.md, "RunPods".
#
#   head:    ROLE=head   /home/ray/app/runpods/start.sh
#   worker:  ROLE=worker RAY_HEAD_ADDRESS=10.65.0.2:6380 /home/ray/app/runpods/start.sh
#
# On a RunPods Instant Cluster, ROLE, RAY_HEAD_ADDRESS and RAY_NODE_IP default from the
# variables RunPods sets (NODE_RANK 0 is the head, PRIMARY_ADDR, NODE_ADDR).
#
# Environment (set them in the pod template; secrets as RunPods secrets):
#   ROLE                head | worker
#   RAY_AUTH_TOKEN      the cluster's token, the same on every pod and client (required)
#   DATABASE_URL        external PostgreSQL with pgvector >= 0.8 (required)
#   REDIS_URL           external Redis for the cache (recommended)
#   RAY_HEAD_ADDRESS    workers: host:port of the head's GCS
#   RAY_PORT            head: GCS port (default 6380; 6379 is often a Redis)
#   RAY_NODE_IP         the address other pods reach this pod at (default: Ray's guess)
#   RAY_NUM_CPUS        logical CPUs to offer (default: Ray's detection)
#   EMBEDDING_GPU_SLOTS custom resource embedding_gpu to offer (default: the GPU count), which
#                       is what the Embedding deployment's GPU replicas ask for
#   SERVE_CONFIG        head: the config to deploy (default: serve_config.yaml beside this script)
#   RUN_MIGRATIONS      head: 1 (default) runs `halldyll migrate` before deploying; 0 skips it
#   DRY_RUN             1: print the commands instead of running them
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DRY_RUN="${DRY_RUN:-0}"

if [ -z "${ROLE:-}" ] && [ -n "${NODE_RANK:-}" ]; then
    if [ "$NODE_RANK" = 0 ]; then ROLE="head"; else ROLE="worker"; fi
fi
ROLE="${ROLE:-}"
RAY_PORT="${RAY_PORT:-6380}"
RAY_NODE_IP="${RAY_NODE_IP:-${NODE_ADDR:-}}"
if [ -z "${RAY_HEAD_ADDRESS:-}" ] && [ -n "${PRIMARY_ADDR:-}" ]; then
    RAY_HEAD_ADDRESS="${PRIMARY_ADDR}:${RAY_PORT}"
fi
SERVE_CONFIG="${SERVE_CONFIG:-$here/serve_config.yaml}"
RUN_MIGRATIONS="${RUN_MIGRATIONS:-1}"

die() {
    echo "start.sh: $*" >&2
    exit 2
}

run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

case "$ROLE" in
head | worker) ;;
*) die "set ROLE=head or ROLE=worker (or NODE_RANK on an Instant Cluster)" ;;
esac
[ -n "${RAY_AUTH_TOKEN:-}" ] || die "RAY_AUTH_TOKEN is required (the same token on every pod)"
[ -n "${DATABASE_URL:-}" ] || die "DATABASE_URL is required (external PostgreSQL with pgvector)"
[ -n "${REDIS_URL:-}" ] || echo "start.sh: REDIS_URL unset: each replica caches in-process only" >&2
export RAY_AUTH_MODE=token
# Ray Serve's throughput-optimized mode with HAProxy on port 8000 (halldyll_ray/serve_env.py).
export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
export RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE="${RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE:-1}"
export RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH="${RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH:-268435456}"

# GPUs on this pod, and the custom resource that places Embedding replicas on them.
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
fi
slots="${EMBEDDING_GPU_SLOTS:-$gpus}"

# Fixed ports, so a firewall between pods can list them: GCS (head), raylet, object manager,
# dashboard agent, runtime-env agent, metrics, and the worker processes' range.
args=(
    --disable-usage-stats
    --node-manager-port=6381
    --object-manager-port=6382
    --dashboard-agent-grpc-port=6383
    --dashboard-agent-listen-port=52365
    --runtime-env-agent-port=6384
    --metrics-export-port=8080
    --min-worker-port=10002
    --max-worker-port=10999
)
if [ -n "$RAY_NODE_IP" ]; then
    args+=("--node-ip-address=$RAY_NODE_IP")
fi
if [ -n "${RAY_NUM_CPUS:-}" ]; then
    args+=("--num-cpus=$RAY_NUM_CPUS")
fi
if [ "$slots" -gt 0 ]; then
    args+=("--resources={\"embedding_gpu\": $slots}")
fi

if [ "$ROLE" = worker ]; then
    [ -n "${RAY_HEAD_ADDRESS:-}" ] || die "workers need RAY_HEAD_ADDRESS=host:port of the head"
    # --block keeps Ray in the foreground: when it stops (the head went away), the script
    # exits non-zero and the pod can be restarted to rejoin.
    run ray start --address="$RAY_HEAD_ADDRESS" "${args[@]}" --block
    if [ "$DRY_RUN" = 1 ]; then
        exit 0
    fi
    echo "start.sh: Ray worker stopped" >&2
    exit 1
fi

[ -f "$SERVE_CONFIG" ] || die "no Serve config at $SERVE_CONFIG"
run ray start --head --port="$RAY_PORT" --dashboard-host=0.0.0.0 --dashboard-port=8265 \
    --ray-client-server-port=10001 "${args[@]}"
if [ "$DRY_RUN" != 1 ]; then
    trap 'ray stop' TERM INT
fi

if [ "$RUN_MIGRATIONS" = 1 ]; then
    # Advisory-locked: a second head (or a rerun) waits, then finds nothing to apply.
    run halldyll migrate
fi
# The dashboard's REST API takes the config (RAY_AUTH_TOKEN authenticates the call); it may
# need a few seconds after `ray start` to answer.
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if run serve deploy --address http://127.0.0.1:8265 "$SERVE_CONFIG"; then
        break
    fi
    [ "$attempt" -lt 10 ] || die "serve deploy failed 10 times"
    sleep 5
done

if [ "$DRY_RUN" = 1 ]; then
    exit 0
fi
# Stay in the foreground while Ray runs, so the pod restarts if the head dies.
while ray status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1; do
    sleep 30 &
    wait $!
done
echo "start.sh: Ray head stopped" >&2
exit 1
