#!/usr/bin/env bash
# Runs this repository's GPU test files and GPU benchmarks on a machine with CUDA GPUs and the backends
# installed (scripts/install_backends.sh), one log per stage in OUT_DIR.
#
#   scripts/gpu_checks.sh OUT_DIR STAGE...
#
# Stages:
#   tests1  one process per GPU (NCCL): the torch backend, its Triton routing kernels, graph capture of the torch backend
#   tests2  two processes (they may share one GPU: gloo group, tokens through CUDA IPC): DeepEP, UCCL-EP,
#           HybridEP and graph capture of the fused backends, in one pytest command
#   compat  two processes: the compat modules on the real libraries
#   property  two processes: the routing property run (tests/test_gpu_routing_property.py) on the torch
#           backend and the installed DeepEP, UCCL-EP and HybridEP; PROPERTY_CASES cases (default 120), the
#           tally in OUT_DIR/property_summary.json
#   bench   a2a-bench env, breakdown (torch backend, 1 process) and overhead (1 and 2 processes)
#   sweep   a 1-process torch sweep (kernel/api/graph), and a 2-process sweep of the fused backends'
#           knobs with two routings, then tune, table, compare and export; the run folders in runs.tar.gz
#   mps     2 ranks sharing GPU 0 under MPS (--share-gpu mps; a2a-bench starts and stops the daemon): a
#           sweep of the fused backends at hidden 7168, 4096 tokens over SMs 8-64, then tune, table,
#           the time-over-SMs plot (plots-mps/) and speedup through fused_a2a with the table found at
#           run time; then tests/test_gpu_mps.py under a daemon started here, as a user of a plain
#           torchrun starts one; the run folders in runs-mps.tar.gz
# The 2-rank a2a-bench commands launch through `a2a-bench --nproc 2`: where the ranks share a GPU it runs
# them under MPS (real timings of a virtual 2-rank cluster, cluster id <gpu>-x1-mps2) and loads
# tests/nvlink_check_off.py into every rank (DeepEP's hybrid-ep Buffer asserts NVLink between the
# ranks' GPUs, which ranks on one GPU cannot pass). The pytest stages on one GPU are time-sliced: only
# statuses and verification mean something there.
set -uo pipefail
out=${1:?usage: scripts/gpu_checks.sh OUT_DIR STAGE...}
shift
mkdir -p "$out"
export COLUMNS=${COLUMNS:-220} PYTHONUNBUFFERED=1
launch="python -m torch.distributed.run --standalone"
# a2a-bench on 2 local ranks, with the test plugin that lets ranks sharing a GPU build DeepEP's buffer
tests=$(cd "$(dirname "$0")/../tests" && pwd)
ranks2="env PYTHONPATH=$tests${PYTHONPATH:+:$PYTHONPATH} A2A_BENCH_BACKENDS=nvlink_check_off python -m a2a_bench"
runs=$(mktemp -d)

run() {  # run LOG COMMAND...: append the command, its output and its exit status to OUT_DIR/LOG.log
    local log=$out/$1.log
    shift
    echo "== $(date -u +%H:%M:%S) $*" >>"$log"
    "$@" >>"$log" 2>&1
    echo "== exit $? at $(date -u +%H:%M:%S)" >>"$log"
}

for stage in "$@"; do
    case $stage in
    tests1)
        run tests1 $launch --nproc-per-node 1 -m pytest -m gpu -q -s -rfE -p no:cacheprovider \
            tests/test_gpu_torch_backend.py tests/test_gpu_torch_routing.py tests/test_gpu_graph.py ;;
    tests2)
        run tests2 $launch --nproc-per-node 2 -m pytest -m gpu -q -s -rfE -p no:cacheprovider \
            tests/test_gpu_deepep.py tests/test_gpu_uccl.py tests/test_gpu_hybridep.py tests/test_gpu_graph.py ;;
    compat)
        run compat $launch --nproc-per-node 2 -m pytest -m gpu -q -s -rfE -p no:cacheprovider tests/test_gpu_compat.py ;;
    property)
        PROPERTY_SUMMARY=$out/property_summary.json run property $launch --nproc-per-node 2 -m pytest -m gpu -q -s -rfE \
            -p no:cacheprovider tests/test_gpu_routing_property.py ;;
    bench)
        run bench python -m a2a_bench env
        run bench $launch --nproc-per-node 1 -m a2a_bench breakdown --hidden 2048,7168 --tokens 128,4096 --iters 20
        run bench $launch --nproc-per-node 1 -m a2a_bench overhead --backends torch
        run bench $ranks2 overhead --nproc 2 --backends deepep,hybridep,uccl ;;
    sweep)
        run sweep $launch --nproc-per-node 1 -m a2a_bench sweep --backends torch --hidden 2048,7168 --tokens 128,4096 \
            --topk 8 --experts 64 --knob torch.impl=all_to_all,p2p --exhaustive --out "$runs/torch-1"
        run sweep python -m a2a_bench tune "$runs/torch-1" --by api --out "$runs/tables"
        run sweep $ranks2 sweep --nproc 2 --backends deepep,hybridep,uccl --hidden 2048 --tokens 7,256 \
            --topk 8 --experts 16 --routing uniform,zipf:1.2 --sms 16,24 --knob hybridep.tokens_per_chunk_dispatch=0,128 \
            --iters 5 --warmup 2 --exhaustive --out "$runs/fused-2"
        run sweep python -m a2a_bench tune "$runs/fused-2" --out "$runs/tables"
        run sweep python -m a2a_bench tune "$runs/fused-2" --by seed --out "$runs/tables-seed"
        for table in "$runs"/tables/*/; do run sweep python -m a2a_bench table "$table"; done
        run sweep python -m a2a_bench compare "$runs/fused-2" --hidden 2048 --tokens 256 --routing zipf:1.2
        for cluster in "$runs"/tables/*/; do
            run sweep python -m a2a_bench export --format env --backend hybridep --hidden 2048 --tokens 256 \
                --world-size 2 --cluster-dir "$cluster"
        done
        tar -czf "$out/runs.tar.gz" -C "$runs" . ;;
    mps)
        run mps python -m a2a_bench env
        run mps $ranks2 sweep --nproc 2 --share-gpu mps --backends deepep,hybridep,uccl --hidden 7168 --tokens 4096 \
            --topk 8 --experts 64 --sms 8,16,20,24,32,48,64 --out "$runs/mps-2"
        run mps python -m a2a_bench tune "$runs/mps-2" --out "$runs/tables-mps"
        for table in "$runs"/tables-mps/*/; do run mps python -m a2a_bench table "$table"; done
        run mps python -m a2a_bench plot "$runs/mps-2" --metric time --out "$out/plots-mps"
        run mps env FUSED_A2A_TUNING_DIR="$runs/tables-mps" $ranks2 speedup --nproc 2 --share-gpu mps --from-table \
            --path api,seed
        mps_env="env CUDA_MPS_PIPE_DIRECTORY=$runs/mps-pipe CUDA_MPS_LOG_DIRECTORY=$runs/mps-log"
        mkdir -p "$runs/mps-pipe" "$runs/mps-log"
        run mps $mps_env nvidia-cuda-mps-control -d
        run mps $mps_env $launch --nproc-per-node 2 -m pytest -m gpu -q -s -rfE -p no:cacheprovider tests/test_gpu_mps.py
        run mps bash -c "echo quit | $mps_env nvidia-cuda-mps-control"
        tar -czf "$out/runs-mps.tar.gz" -C "$runs" mps-2 tables-mps ;;
    *)
        echo "unknown stage $stage (tests1, tests2, compat, property, bench, sweep, mps)" >&2
        exit 2 ;;
    esac
done
