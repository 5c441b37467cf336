#!/usr/bin/env bash
# Launch training on one node with torchrun.
#   launch/torchrun.sh NPROC CONFIG [--set key=value ...]
#   launch/torchrun.sh 8 configs/gpt_350m_8gpu.yaml --set train.lr=3e-4
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG [--set key=value ...]" >&2
  exit 2
fi
nproc=$1 config=$2
shift 2
default_python=python3
[ -x .venv/bin/python ] && default_python=.venv/bin/python
PYTHON=${PYTHON:-$default_python}
# One intra-op thread per rank unless told otherwise: ranks share the node's cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Ctrl-C / SIGTERM to torchrun: it forwards the signal and the ranks finish their step and save; torchrun
# kills them after this many seconds (its default, 30, can cut a large checkpoint short).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m ppmoe train "$config" "$@"
