#!/usr/bin/env bash
# The first GPU minutes: one script, one GPU, no internet, under 9 minutes (docs/gpu.md).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--wheels DIR]   # on the GPU machine (any working directory)
#   bash benchmarks/gpu_check.sh --fetch-wheels DIR       # beforehand, on a machine that reaches PyPI
#
# Steps, each under its own time limit inside one budget (GPU_CHECK_BUDGET_S, default 530 s); a failed, timed-out
# or skipped step is reported and the others still run:
#   env            nvidia-smi and the versions of python, torch, triton, transformers, deepspeed, sglang
#   install        this tree installed editable without index or build isolation (builds the C++ segmenter)
#   gpu_tests      pytest -m gpu: the Triton kernels against their float64 twins at full shapes
#   bench_gae, bench_ppo_loss, bench_logprob   the kernel benchmarks at their full GPU shapes
#   profile        benchmarks/gpu_check_profile.py: wall, host and GPU kernel time per fused PPO-loss / GAE call,
#                  and the floor of one Triton launch and one torch op
#   decode         benchmarks/gpu_check_decode.py: ms per decode step of the tiny model (rollout engine, plain
#                  generate, each SDPA backend, one cached forward) and the profiler's top operators
#   steppo         a one-GPU `deepspeed` StePPO run of 2 steps on the tiny preset with the Triton kernels, bf16
#                  and activation checkpointing (as the cluster presets)
#   sglang         when sglang imports: benchmarks/gpu_check_sglang.py on the tiny model saved with
#                  save_pretrained (generation with log-probs, weight update, memory release and resume, eight
#                  threads generating at once)
# Results in OUT_DIR, eight files: summary.md, steps.csv, gae.csv, ppo_loss.csv, logprob.csv, steppo_metrics.csv,
# sglang.csv, log.txt (the tail of every step's output). Scratch files go to a temporary directory.
#
# What the GPU machine needs: python3 with CUDA torch, triton, transformers, tokenizers, safetensors, numpy, scipy,
# pyyaml, tqdm, scikit-learn, matplotlib, pytest, pytest-timeout, hypothesis, pybind11, setuptools, wheel and a C++
# compiler. The lent image (Python 3.12, torch 2.11, triton 3.6, transformers 5.17) has all of these but not
# deepspeed (nor its hjson and pydantic) and bm25s (the tiny preset's BM25 index): `--fetch-wheels DIR` downloads
# them for Python 3.12 x86-64 (a few MiB, deepspeed as its source archive), `--wheels DIR` installs them into the
# scratch directory. SGLang is far larger than a working tree may carry; without it the sglang step is skipped.
set -uo pipefail

PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-530}

usage() {
    sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

fetch_wheels() {
    local dir=$1 core
    local binary=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    mkdir -p "$dir" || return 1
    "$PY" -m pip download -q --no-deps "${binary[@]}" -d "$dir" hjson pydantic annotated-types typing-inspection \
        bm25s || return 1
    # pydantic pins its compiled core exactly: fetch the version the downloaded pydantic names
    core=$("$PY" - "$dir" <<'EOF'
import glob, re, sys, zipfile
wheel = zipfile.ZipFile(sorted(glob.glob(f"{sys.argv[1]}/pydantic-[0-9]*.whl"))[-1])
metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
print(re.search(r"^Requires-Dist: pydantic-core==([\w.]+)", metadata, re.M).group(1))
EOF
    ) || return 1
    "$PY" -m pip download -q --no-deps "${binary[@]}" -d "$dir" "pydantic-core==$core" || return 1
    "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$dir" \
        "deepspeed==${DEEPSPEED_VERSION:-0.19.8}" || return 1
    ls -l "$dir"
}

if [[ $# -ge 1 && $1 == --fetch-wheels ]]; then
    [[ $# -eq 2 ]] || usage
    fetch_wheels "$2"
    exit $?
fi
[[ $# -eq 1 || ($# -eq 3 && $2 == --wheels) ]] || usage
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "gpu_check: cannot create $1" >&2; exit 2; }
WHEELS=${3:-}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
cd "$REPO" || exit 2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -f "$OUT"/{summary.md,steps.csv,gae.csv,ppo_loss.csv,logprob.csv,steppo_metrics.csv,sglang.csv,log.txt}
echo "step,status,seconds,detail" > "$OUT/steps.csv"
: > "$OUT/log.txt"
START=$SECONDS
FAILED=0

csv_field() { local text=${1//\"/\'}; printf '"%s"' "${text//$'\n'/ }"; }

# record NAME STATUS SECONDS DETAIL: one row of steps.csv
record() {
    echo "$1,$2,$3,$(csv_field "$4")" >> "$OUT/steps.csv"
    [[ $2 == ok || $2 == skipped ]] || FAILED=1
}

# step NAME CAP_SECONDS COMMAND...: run it under min(cap, what is left of the budget), log to $WORK/NAME.log;
# sets STATUS (ok, failed, timeout) and ELAPSED, appends the log's tail to log.txt
step() {
    local name=$1 cap=$2 left limit tick rc
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        STATUS=timeout ELAPSED=0
        echo "== $name: not started, the ${BUDGET}s budget is spent" >> "$OUT/log.txt"
        return 1
    fi
    tick=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    ELAPSED=$((SECONDS - tick))
    if ((rc == 0)); then STATUS=ok; elif ((rc == 124 || rc == 137)); then STATUS=timeout; else STATUS=failed; fi
    { echo "== $name: $STATUS after ${ELAPSED}s (limit ${limit}s, exit $rc)"; tail -n 40 "$WORK/$name.log"; } \
        >> "$OUT/log.txt"
    return $rc
}

# log_section TITLE COMMAND...: a summary.md section holding the first 40 lines COMMAND prints, as a code block
# shellcheck disable=SC2317  # invoked by write_summary
log_section() {
    local title=$1
    shift
    echo
    echo "## $title"
    echo
    echo '```'
    "$@" | head -n 40
    echo '```'
}

# summary.md from steps.csv and the benchmarks' printed tables; written however the script ends
# shellcheck disable=SC2317  # invoked by the EXIT trap
write_summary() {
    {
        echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "${GPU:-no GPU information}; ${VERSIONS:-}. Total $((SECONDS - START)) s of the ${BUDGET} s budget."
        echo
        echo "| step | status | seconds | detail |"
        echo "|---|---|---:|---|"
        tail -n +2 "$OUT/steps.csv" | while IFS=, read -r name status seconds detail; do
            detail=${detail#\"}
            echo "| $name | $status | $seconds | ${detail%\"} |"
        done
        for bench in gae ppo_loss logprob; do
            [[ -f $WORK/bench_$bench.log ]] || continue
            log_section "bench_$bench (printed table; every row in $bench.csv)" tail -n 30 "$WORK/bench_$bench.log"
        done
        [[ -f $WORK/profile.log ]] && log_section "profile (printed table)" \
            grep -v '^USDT' "$WORK/profile.log"
        [[ -f $WORK/decode.log ]] && log_section "decode (printed table and profile)" \
            sed -n '/^decode step of/,$p' "$WORK/decode.log"
    } > "$OUT/summary.md"
    rm -rf "$WORK"
    echo "gpu_check: $(grep -c ',ok,' "$OUT/steps.csv") steps ok; summary in $OUT/summary.md"
}
trap write_summary EXIT

# ---- env --------------------------------------------------------------------------------------------------------
if [[ -n $WHEELS ]]; then
    step wheels 120 bash -c "'$PY' -m pip install -q --no-index --no-deps --no-compile --target '$WORK/site' \
        '$WHEELS'/*.whl && '$PY' -m pip install -q --no-index --no-deps --no-compile --no-build-isolation \
        --target '$WORK/site' '$WHEELS'/deepspeed-*.tar.gz"
    record wheels "$STATUS" "$ELAPSED" "deepspeed, hjson, pydantic, bm25s from $WHEELS into the scratch directory"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
VERSIONS=$("$PY" - <<'EOF' 2>/dev/null
import importlib, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})", end="")
for name in ("triton", "transformers", "deepspeed", "sglang", "flash_attn"):
    try:
        print(f", {name} {importlib.import_module(name).__version__}", end="")
    except Exception as exc:
        print(f", {name} absent ({type(exc).__name__})", end="")
print(f"; cuda available: {torch.cuda.is_available()}")
EOF
)
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
GPU=${GPU:-nvidia-smi gave no GPU}
record env ok 0 "$GPU; $VERSIONS"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    record cuda failed 0 "torch sees no CUDA device: nothing else can run"
    echo "gpu_check: torch sees no CUDA device ($VERSIONS)" >&2
    exit 1
fi

# ---- install ----------------------------------------------------------------------------------------------------
step install 150 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO"
record install "$STATUS" "$ELAPSED" "editable install, C++ segmenter built"

# ---- gpu tests --------------------------------------------------------------------------------------------------
# only the files that hold `gpu` tests are collected: the others import packages a GPU image may lack (faiss)
mapfile -t GPU_TEST_FILES < <(grep -rlE "mark\.gpu\b" tests --include='test_*.py' | sort)
step gpu_tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${GPU_TEST_FILES[@]}"
record gpu_tests "$STATUS" "$ELAPSED" "$(grep -E '(passed|failed|error|skipped|deselected)' "$WORK/gpu_tests.log" | tail -n 1)"

# ---- kernel benchmarks at full shapes ---------------------------------------------------------------------------
for bench in gae ppo_loss logprob; do
    step "bench_$bench" 60 "$PY" "benchmarks/bench_$bench.py" --out "$OUT/$bench.csv"
    record "bench_$bench" "$STATUS" "$ELAPSED" "$bench.csv: $(($(wc -l 2>/dev/null < "$OUT/$bench.csv" || echo 1) - 1)) rows"
done

# ---- host path vs kernels of the fused calls ----------------------------------------------------------------------
step profile 60 "$PY" benchmarks/gpu_check_profile.py
record profile "$STATUS" "$ELAPSED" "$(grep -E '^(ppo_loss|scatter_kl_gae) ' "$WORK/profile.log" | awk '{printf "%s: wall %s us, host %s us, GPU %s us; ", $1, $(NF-3), $(NF-2), $(NF-1)}')"

# ---- decode step cost of the tiny model --------------------------------------------------------------------------
step decode 60 "$PY" benchmarks/gpu_check_decode.py
record decode "$STATUS" "$ELAPSED" "$(grep -E '^(engine|generate|forward)' "$WORK/decode.log" | awk '{printf "%s %s ms/step; ", $1, $2}')"

# ---- a one-GPU deepspeed StePPO run -----------------------------------------------------------------------------
# Responses are capped at 256 tokens: a policy this briefly warm-started often repeats itself to every cap
RUN="$WORK/runs/steppo"
step steppo 200 "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port $((29500 + RANDOM % 400)) \
    stepsearch/train.py --config configs/tiny_cpu.yaml trainer.device=cuda kernels.impl=triton \
    trainer.total_steps=2 trainer.output_dir="$WORK/runs" trainer.run_name=steppo trainer.save_every=0 \
    trainer.warm_start_steps=40 trainer.eval_max_questions=4 trainer.report=false trainer.tensorboard=false \
    data.synth_num_train=64 data.synth_num_test=8 rollout.max_response_tokens=256 model.gradient_checkpointing=true
STEPPO_DETAIL=$("$PY" - "$RUN/metrics.jsonl" "$OUT/steppo_metrics.csv" <<'EOF' 2>&1
import csv, json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
with open(sys.argv[2], "w", newline="", encoding="utf-8") as handle:
    writer = csv.writer(handle)
    writer.writerow(["step", "metric", "value"])
    for row in rows:
        for key, value in sorted(row.items()):
            if key != "step" and isinstance(value, (int, float)):
                writer.writerow([row["step"], key, value])
finite = all(math.isfinite(r[k]) for r in rows for k in ("loss/policy", "loss/value", "kl") if r.get(k) is not None)
print(f"{len(rows)} steps; step time " + ", ".join(f"{r.get('time/step_s', float('nan')):.1f}s" for r in rows)
      + f"; losses finite: {finite}")
sys.exit(0 if len(rows) == 2 and finite else 1)
EOF
)
METRICS_OK=$?
[[ $STATUS == ok && $METRICS_OK -ne 0 ]] && STATUS=failed
record steppo "$STATUS" "$ELAPSED" "$STEPPO_DETAIL"

# ---- sglang -----------------------------------------------------------------------------------------------------
if SGLANG_ERROR=$("$PY" -c "import sglang" 2>&1); then
    step sglang 150 "$PY" benchmarks/gpu_check_sglang.py --out "$WORK/sglang"
    cp "$WORK/sglang/sglang.csv" "$OUT/sglang.csv" 2>/dev/null
    record sglang "$STATUS" "$ELAPSED" "$(grep -cE '^ok ' "$WORK/sglang.log") checks ok, $(grep -cE '^FAIL' \
        "$WORK/sglang.log") failed (sglang.csv)"
else
    echo "check,ok,value,unit,detail" > "$OUT/sglang.csv"
    record sglang skipped 0 "sglang does not import: $(echo "$SGLANG_ERROR" | tail -n 1)"
fi

exit $FAILED
