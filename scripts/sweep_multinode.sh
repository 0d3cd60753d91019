#!/usr/bin/env bash
# Run an a2a-bench sweep across nodes with torchrun (c10d rendezvous). Start it once on every node.
#
#   scripts/sweep_multinode.sh [--dry-run] --nnodes N --master HOST[:PORT] [--nproc-per-node G]
#       [--run-id ID] [--max-restarts R] -- <a2a-bench sweep options>
#
# --resume is always passed: after a restart (a rank died, a point timed out) the sweep continues
# from the next point. --dry-run prints the command instead of running it.
set -euo pipefail

dry_run=0 nnodes="" master="" nproc_per_node="" run_id="a2a-bench" max_restarts=3
die() { echo "sweep_multinode.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nnodes) nnodes="${2:-}"; shift 2 || die "--nnodes needs a value" ;;
    --master) master="${2:-}"; shift 2 || die "--master needs a value" ;;
    --nproc-per-node) nproc_per_node="${2:-}"; shift 2 || die "--nproc-per-node needs a value" ;;
    --run-id) run_id="${2:-}"; shift 2 || die "--run-id needs a value" ;;
    --max-restarts) max_restarts="${2:-}"; shift 2 || die "--max-restarts needs a value" ;;
    --) shift; break ;;
    *) die "unknown option $1 (sweep options go after --)" ;;
  esac
done
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '${nnodes}'"
[ -n "$master" ] || die "--master HOST[:PORT] is required"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '${max_restarts}'"
if [ -z "$nproc_per_node" ]; then
  nproc_per_node=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$nproc_per_node" -gt 0 ] || nproc_per_node=1
fi
[[ "$nproc_per_node" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer, got '${nproc_per_node}'"
[[ "$master" == *:* ]] || master="${master}:29500"

cmd=(torchrun --nnodes "$nnodes" --nproc-per-node "$nproc_per_node" --rdzv-backend c10d
     --rdzv-endpoint "$master" --rdzv-id "$run_id" --max-restarts "$max_restarts"
     -m a2a_bench sweep --resume "$@")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
