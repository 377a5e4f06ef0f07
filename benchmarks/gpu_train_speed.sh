#!/bin/bash
# Training throughput of `python -m lgg train unet` itself on a GPU, Keras on PyTorch (the GPU machine
# lent to this project has PyTorch, not TensorFlow): three settings, 1.25 training minutes each, on the
# first 16 cases of the data set (the default patient split of those: 10 training cases). A speed
# measurement, not a model: the Dice such a run reaches says nothing.
#
#   # here, once (the GPU machine reaches no package index and no ../shared):
#   mkdir -p .gpu/lgg/kaggle_3m .whl
#   cp ../shared/lgg/restore.py ../shared/lgg/manifest.csv .gpu/lgg/
#   cp ../shared/lgg/kaggle_3m/README.md ../shared/lgg/kaggle_3m/data.csv .gpu/lgg/kaggle_3m/
#   for c in $(ls -d ../shared/lgg/kaggle_3m/TCGA_* | sort | head -16); do cp -r "$c" .gpu/lgg/kaggle_3m/; done
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl \
#       keras==3.15.1 namex optree
#   # on the GPU machine, with .gpu and .whl beside the checkout:
#   OUT=results/gpu/cli bash benchmarks/gpu_train_speed.sh
#   # the summary alone, again, from the histories:
#   bash benchmarks/gpu_train_speed.sh --summarize results/gpu/cli
#
# The committed results/gpu/cli came from the first version of this script, whose machine.txt printed the core
# count and the torch / keras versions bare; what it ran was the same.
#
# Writes OUT/machine.txt, OUT/dmon.log (GPU utilization), OUT/<setting>.log, OUT/<setting>-history.csv (lgg's
# own history: the steady-state `train_slices_per_s` of each epoch) and OUT/gpu_train_speed.json (the median
# over epochs after the first, per setting). A setting that fails stops the script (exit status 1).
set -u

summarize() {
    python3 - "$1" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {}
for history in sorted(out.glob("*-history.csv")):
    rows = list(csv.DictReader(history.open()))
    rates = [float(row["train_slices_per_s"]) for row in rows[1:]]  # the first epoch holds start-up
    if not rates:
        sys.exit(f"error: {history} has {len(rows)} epoch(s): no steady-state epoch to summarize")
    summary[history.name.removesuffix("-history.csv")] = {
        "epochs": len(rows),
        "training_s": round(float(rows[-1]["elapsed_s"]), 1),
        "median_train_slices_per_s": round(statistics.median(rates), 1),
        "min_train_slices_per_s": round(min(rates), 1),
        "max_train_slices_per_s": round(max(rates), 1),
    }
machine = out / "machine.txt"
summary = {"machine": machine.read_text().strip().splitlines() if machine.exists() else None, "settings": summary}
(out / "gpu_train_speed.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
}

if [ "${1:-}" = "--summarize" ]; then
    if [ -z "${2:-}" ] || ! compgen -G "$2/*-history.csv" > /dev/null; then
        echo "error: ${2:-(no folder given)}: no <setting>-history.csv to summarize" >&2
        exit 2
    fi
    summarize "$2"
    exit
fi

: "${OUT:?set OUT to a new or empty folder that receives the logs}"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then  # never write over what this script did not write
    echo "error: OUT=$OUT is not empty: choose a new folder" >&2
    exit 2
fi
mkdir -p "$OUT"
scratch=$(mktemp -d)  # the wheels, the data and the run folders: this script's own, removed at the end
dmon=
trap 'rm -rf "$scratch"; [ -n "$dmon" ] && kill "$dmon" 2>/dev/null' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch/site" .whl/*.whl || exit 1
export PYTHONPATH=$scratch/site:$PWD KERAS_BACKEND=torch PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    echo "cpu cores: $(nproc)"
    python3 -c "import torch, keras; print('torch', torch.__version__, 'keras', keras.__version__, 'cuda', torch.cuda.is_available())"
    lscpu | grep 'Model name'
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
data=$scratch/data
python3 .gpu/lgg/restore.py "$data" --cases 16 --workers 16 || exit 1
nvidia-smi dmon -s u -d 5 > "$OUT/dmon.log" 2>&1 &  # GPU utilization every 5 s, through all three runs
dmon=$!
for setting in "b16-128-f32:--image-size 128 --batch-size 16 --precision float32" \
    "b16-128-bf16:--image-size 128 --batch-size 16 --precision mixed_bfloat16" \
    "b32-256-bf16:--image-size 256 --batch-size 32 --precision mixed_bfloat16"; do
    name=${setting%%:*}
    run=$scratch/$name
    # shellcheck disable=SC2086  # the setting's flags are meant to split
    python3 -m lgg train unet --data "$data" --out "$run" --max-minutes 1.25 --schedule time-cosine ${setting#*:} \
        > "$OUT/$name.log" 2>&1
    status=$?
    echo "$name: exit status $status"
    if [ "$status" -ne 0 ] || ! cp "$run/history.csv" "$OUT/$name-history.csv"; then
        echo "error: the $name run failed: $OUT/$name.log says why" >&2
        exit 1
    fi
done
summarize "$OUT"
