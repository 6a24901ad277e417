#!/usr/bin/env bash
# One-GPU smoke test of dpokit (FSDP2, ZeRO-3, LoRA, QLoRA) and TRL DPOTrainer at ~1B parameters, bf16.
#
#   bash bench/gpu_check.sh              # one CUDA GPU; sized for < 8 min on an H100/H200 (not yet run on one)
#   bash bench/gpu_check.sh --dry-run    # the same sequence on CPU with a tiny float32 model (< 3 minutes)
#
# Other options (--runs, --checkpoint, --workdir) are passed to bench/gpu_check.py; see its --help.
# Exit status: 0 when every run passed, non-zero when any failed (its command and log tail are printed).
# Python: $PYTHON if set (a test should pass sys.executable), else the active virtualenv ($VIRTUAL_ENV), else
# the repository's .venv if there is one, else `python3` on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    py="$VIRTUAL_ENV/bin/python"
elif [[ -x "$repo/.venv/bin/python" ]]; then
    py="$repo/.venv/bin/python"
else
    py="python3"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$py" "$here/gpu_check.py" "$@"
