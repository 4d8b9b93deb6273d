#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU (CI never runs this; it needs no network):
#   1. the sharded code path with NCCL on one GPU: the demo for 5 steps under torchrun (one process,
#      FSDP2) against the same steps unsharded, final weights compared, in fp32 and bf16-mixed;
#   2. the Triton kernel tests, compiled for the GPU (no interpreter);
#   3. bench/losses.py and bench/trainer_memory.py on the GPU.
# Results land in bench/results/*-cuda.{json,txt}, copied to $OUT when the caller sets it (e.g. the
# device tool's output folder). From the repository root, with the test extras installed:
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
demo=examples/arithmetic/opd.toml
short=(--no-progress --unset data.eval --set train.steps=5 --set checkpoint.every_steps=0)

echo "== 1. FSDP2 + NCCL on one GPU vs the unsharded run, fp32 and bf16-mixed"
for precision in fp32 bf16-mixed; do
    run=("${short[@]}" --set "trainer.precision='$precision'")
    distill-run run "$demo" "${run[@]}" --set "output_dir='$work/plain-$precision'" > "$work/plain-$precision.log"
    torchrun --standalone --nproc_per_node 1 -m distill.cli run "$demo" "${run[@]}" \
        --set "output_dir='$work/sharded-$precision'" > "$work/sharded-$precision.log"
done
python - "$work" bench/results/fsdp-parity-cuda.json <<'EOF'
import json, sys
from safetensors.torch import load_file
work, out = sys.argv[1:]
gaps, tolerances = {}, {"fp32": 1e-4, "bf16-mixed": 1e-2}
for precision in tolerances:
    plain, sharded = (load_file(f"{work}/{run}-{precision}/final/model.safetensors") for run in ("plain", "sharded"))
    gaps[precision] = max(float((plain[k] - sharded[k]).abs().max()) for k in plain)
    print(f"{precision}: max |plain - sharded| after 5 steps: {gaps[precision]:.3g}")
json.dump({"max_abs_weight_difference": gaps, "steps": 5}, open(out, "w"), indent=1)
sys.exit(any(gaps[p] > tolerances[p] for p in gaps))
EOF

echo "== 2. Triton kernels on the GPU"
python -m pytest -q -m triton tests/plugins/test_fused_losses.py

echo "== 3. benchmarks"
python bench/losses.py --device cuda                       # bench/results/losses-cuda.*
python bench/losses.py --device cuda --loss jsd            # bench/results/losses-jsd-cuda.*
# one GPU: the FSDP2 rows need a device per process
python bench/trainer_memory.py --device cuda --configs fp32 bf16-mixed lora-r16 fp32+checkpointing bf16
if [ -n "${OUT:-}" ]; then cp bench/results/*-cuda.* "$OUT"/; fi
