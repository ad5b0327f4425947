#!/usr/bin/env bash
# The GPU checks as one short run, for a session that is lent a GPU machine for a few minutes. That machine has no
# network, and its image holds Python 3.12 with a CUDA torch, accelerate, safetensors, numpy, pillow and pytest, but
# not diffusers, lycoris-lora or this project's optimizer packages (nor its transformers and regex versions).
#
#   bash bench/device_check.sh --prepare   here, with network: those packages as Python 3.12 wheels in .whl/
#                                          (ignored by git; about 21 MB)
#   bash bench/device_check.sh             there, with .whl carried: installs them into /tmp/site, then prints the
#                                          GPU and the versions, runs the tests marked gpu and the GPU benchmarks
#                                          (bench/train_step.py --gpu, then --gpu --only flux); each log goes
#                                          to $OUT (the device tool's folder) or ./device_logs
#
# Each part has its own time limit (DEVICE_TEST_S, DEVICE_BENCH_S, DEVICE_FLUX_S seconds) so that the whole run
# ends inside one call (60 + 150 + 200 + 150 s by default, under the device tool's 600 s per call with the
# install); a part that fails or runs out of time is reported and the next one still runs.
set -u
cd "$(dirname "$0")/.."

pin() {  # the version requirements.txt pins for a package
    grep -i -m1 "^$1==" requirements.txt || { echo "requirements.txt pins no $1" >&2; exit 1; }
}
# wheels for any Python (pip builds them here when the index has only a source archive): the project's pins, and
# diffusers' importlib_metadata, which the image lacks
PURE=($(for name in diffusers transformers lycoris_lora lion-pytorch dadaptation prodigyopt toml; do pin "$name"; done)
      importlib_metadata==10.2.0)
[ "${#PURE[@]}" = 8 ] || exit 1
# compiled for CPython 3.12 on x86-64 Linux: transformers needs a newer regex than the image's
BINARY=(regex==2026.12.2)

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl || exit 1
    python3 -m pip wheel -q --no-deps -w .whl "${PURE[@]}" || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${BINARY[@]}" || exit 1
    du -sh .whl
    echo "now: the device tool's run with carry [\".whl\"] and the command: bash bench/device_check.sh"
    exit 0
fi

out="${OUT:-device_logs}"
mkdir -p "$out"
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run 'bash bench/device_check.sh --prepare' first and carry .whl" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

part() {  # part NAME SECONDS COMMAND...: run it with its log in $out/NAME.txt, its last lines on the screen
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (at most ${seconds} s)"
    timeout "$seconds" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.txt"
    echo "=== $name: exit $rc$([ $rc = 124 ] && echo ' (out of time)')"
}

part machine 60 sh -c 'nvidia-smi; python3 -c "import sys, torch, diffusers, transformers, accelerate, lycoris
print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))
print(\"diffusers\", diffusers.__version__, \"transformers\", transformers.__version__, \"accelerate\", accelerate.__version__)"'
part gpu_tests "${DEVICE_TEST_S:-150}" python3 -m pytest -m gpu -q tests
part train_step_gpu "${DEVICE_BENCH_S:-200}" python3 bench/train_step.py --gpu
part flux_gpu "${DEVICE_FLUX_S:-150}" python3 bench/train_step.py --gpu --only flux
