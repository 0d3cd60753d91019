#!/usr/bin/env bash
# Build and install fused_a2a's optional backends into the current Python environment, then run
# `a2a-bench env`:
#   * DeepEP (deep_ep.Buffer and deep_ep.HybridEPBuffer) from a checkout you point at, or cloned at a
#     ref (default: the hybrid-ep branch, which holds both) into --workdir; DeepEP's sources are never
#     part of this repository. Built for the GPUs nvidia-smi sees, with NVSHMEM from pip.
#   * UCCL-EP (uccl.ep) from the package index, with the CUDA 12 runtime it loads.
#
#   scripts/install_backends.sh [--deepep DIR | --deepep-ref REF] [--workdir DIR] [--arch LIST]
#       [--cuda MAJOR.MINOR] [--cuda-home DIR] [--jobs N] [--no-deepep] [--no-uccl] [--dry-run]
#
# --arch: TORCH_CUDA_ARCH_LIST (default: $TORCH_CUDA_ARCH_LIST, else the compute capabilities
# nvidia-smi reports, e.g. 9.0 on H100/H200; DeepEP's HybridEP would otherwise build for 10.0 only).
# --cuda: the CUDA version torch was built with (default: torch.version.cuda); it picks
# nvidia-nvshmem-cu12 or -cu13, and on CUDA 13 CPATH gets CUDA's CCCL include folder.
# --dry-run prints the commands instead of running them. Run it with the Python environment that
# runs your jobs active (PYTHON=... to name another interpreter).
set -euo pipefail

DEEPEP_URL="https://github.com/deepseek-ai/DeepEP.git"
UCCL_PACKAGES=(uccl==0.1.1 intervaltree sortedcontainers nvidia-cuda-runtime-cu12)
PYTHON="${PYTHON:-python}"
dry_run=0 deepep_dir="" deepep_ref="hybrid-ep" workdir="${XDG_CACHE_HOME:-$HOME/.cache}/a2a-bench"
arch="${TORCH_CUDA_ARCH_LIST:-}" cuda="" cuda_home="${CUDA_HOME:-}" jobs="" with_deepep=1 with_uccl=1
die() { echo "install_backends.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --deepep) deepep_dir="${2:-}"; shift 2 || die "--deepep needs a folder" ;;
    --deepep-ref) deepep_ref="${2:-}"; shift 2 || die "--deepep-ref needs a branch, tag or commit" ;;
    --workdir) workdir="${2:-}"; shift 2 || die "--workdir needs a folder" ;;
    --arch) arch="${2:-}"; shift 2 || die "--arch needs a list such as 9.0" ;;
    --cuda) cuda="${2:-}"; shift 2 || die "--cuda needs a version such as 12.8" ;;
    --cuda-home) cuda_home="${2:-}"; shift 2 || die "--cuda-home needs a folder" ;;
    --jobs) jobs="${2:-}"; shift 2 || die "--jobs needs a number" ;;
    --no-deepep) with_deepep=0; shift ;;
    --no-uccl) with_uccl=0; shift ;;
    *) die "unknown option $1" ;;
  esac
done

command -v "$PYTHON" >/dev/null || die "no Python interpreter '$PYTHON' (activate your environment or set PYTHON)"
[ -n "$jobs" ] || jobs=$(nproc 2>/dev/null || echo 8)
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '${jobs}'"
[ -n "$deepep_ref" ] || die "--deepep-ref must not be empty"
if [ -z "$cuda" ]; then
  cuda=$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null) \
    || die "cannot import torch with $PYTHON: install a CUDA build of torch first"
  [ -n "$cuda" ] || die "this torch has no CUDA (torch.version.cuda is None): install a CUDA build of torch, or pass --cuda"
fi
[[ "$cuda" =~ ^(1[2-9])\.[0-9]+$ ]] || die "--cuda must be a CUDA version >= 12 such as 12.8, got '${cuda}'"
cuda_major="${cuda%%.*}"

if [ "$with_deepep" = 1 ]; then
  if [ -z "$arch" ]; then
    arch=$( (nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true) | sort -u | paste -sd ';' -)
    [ -n "$arch" ] || die "nvidia-smi reports no GPU: pass --arch (9.0 for H100/H200, 10.0 for B200)"
  fi
  arch_re='^[0-9]+\.[0-9]+a?([; ][0-9]+\.[0-9]+a?)*$'
  [[ "$arch" =~ $arch_re ]] || die "--arch must be a list such as 9.0 or '9.0;10.0', got '${arch}'"
  if [ -z "$cuda_home" ]; then
    nvcc=$(command -v nvcc || true)
    if [ -n "$nvcc" ]; then cuda_home=$(dirname "$(dirname "$nvcc")"); else cuda_home=/usr/local/cuda; fi
  fi
  if [ "$dry_run" = 0 ]; then
    [ -x "$cuda_home/bin/nvcc" ] || die "no nvcc in $cuda_home/bin: pass --cuda-home (the CUDA toolkit matching torch's CUDA $cuda)"
  fi
  if [ -n "$deepep_dir" ]; then
    [ -f "$deepep_dir/setup.py" ] || die "--deepep $deepep_dir: not a DeepEP checkout (no setup.py)"
  else
    deepep_dir="$workdir/DeepEP"
  fi
fi

run() {  # print the command (dry run), or run it
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@"; echo
  else
    echo "+ $*" >&2
    "$@"
  fi
}

if [ "$with_deepep" = 1 ]; then
  run "$PYTHON" -m pip install "nvidia-nvshmem-cu${cuda_major}"
  if [ ! -f "$deepep_dir/setup.py" ]; then
    run mkdir -p "$workdir"
    run git clone "$DEEPEP_URL" "$deepep_dir"
  fi
  if [ "$deepep_dir" = "$workdir/DeepEP" ]; then
    run git -C "$deepep_dir" fetch origin "$deepep_ref"
    run git -C "$deepep_dir" checkout FETCH_HEAD
  fi
  build_env=(env "TORCH_CUDA_ARCH_LIST=$arch" "CUDA_HOME=$cuda_home" "MAX_JOBS=$jobs")
  if [ "$cuda_major" -ge 13 ]; then
    target="$(uname -m | sed 's/aarch64/sbsa/')-linux"
    build_env+=("CPATH=$cuda_home/targets/$target/include/cccl${CPATH:+:$CPATH}")
  fi
  run "${build_env[@]}" "$PYTHON" -m pip install --no-build-isolation -v "$deepep_dir"
fi

if [ "$with_uccl" = 1 ]; then
  run "$PYTHON" -m pip install "${UCCL_PACKAGES[@]}"
fi

cudart_lib='$('"$PYTHON"' -c "import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], \"lib\"))")'
job_env=()
if [ "$with_uccl" = 1 ] && [ "$dry_run" = 0 ]; then
  cudart_lib=$("$PYTHON" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')
  job_env+=("LD_LIBRARY_PATH=$cudart_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
fi
[ "$with_deepep" = 0 ] || job_env+=("CUDA_HOME=$cuda_home")

echo "# In the environment of the jobs that use these backends:"
[ "$with_uccl" = 0 ] || echo "export LD_LIBRARY_PATH=$cudart_lib:\$LD_LIBRARY_PATH   # UCCL-EP loads libcudart.so.12 from there"
if [ "$with_deepep" = 1 ]; then
  echo "export CUDA_HOME=$cuda_home   # HybridEP compiles its kernels at first use"
  echo "export LD_PRELOAD=/lib/$(uname -m)-linux-gnu/libstdc++.so.6   # only if HybridEPBuffer() segfaults in its constructor"
fi
run env ${job_env[@]+"${job_env[@]}"} "$PYTHON" -m a2a_bench env
