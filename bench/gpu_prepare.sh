#!/usr/bin/env bash
# Prepare the GPU run of bench/gpu_check.py on this machine (which has a network), so that on the
# GPU machine (bare, no network, python3 3.12 with torch 2.11 + CUDA 13, no fairscale, no
# bitsandbytes) it starts at once. From the repository root:
#
#     bash bench/gpu_prepare.sh
#
# It writes, in ignored folders that travel with the `carry` of the device call:
#   .whl/        fairscale's wheel (built: it has only an sdist) and bitsandbytes' manylinux wheel for
#                Python 3.12, slimmed to its CPU and CUDA 13 libraries (43 MB -> a few: the working
#                tree that travels is limited to 64 MiB)
#   ckpts/demo/  the demo model (finetune.demo), which the inference check runs; built here, since
#                its CPU pretraining would spend minutes of GPU time
# and prints the device command (bench/gpu_run.sh) with its carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BNB_VERSION=${BNB_VERSION:-0.50.2}  # CUDA 13.0 libraries from 0.48; this one ran on CPU here (torch 2.13)
FAIRSCALE_VERSION=${FAIRSCALE_VERSION:-0.4.13}

grep -qxF '/.whl/' .gitignore 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
"$PY" -m pip wheel -q --no-deps -w .whl "fairscale==$FAIRSCALE_VERSION"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "bitsandbytes==$BNB_VERSION"

# Keep bitsandbytes' CPU library and its CUDA 13.x ones (it loads the one matching torch.version.cuda),
# and drop the others from the archive and from its RECORD.
"$PY" - <<'PYEOF'
import glob, os, re, zipfile

src = glob.glob(".whl/bitsandbytes-*.whl")[0]
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        name = item.filename
        if "libbitsandbytes_" in name and not keep.search(name):
            continue
        data = zin.read(name)
        if name.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(ln for ln in lines if "libbitsandbytes_" not in ln or keep.search(ln.split(",")[0])) + "\n").encode()
        zout.writestr(item, data)
os.replace(tmp, src)
print(f"{src}: {os.path.getsize(src) / 2**20:.1f} MiB, libraries:",
      sorted(os.path.basename(n) for n in zipfile.ZipFile(src).namelist() if n.endswith(".so")))
PYEOF

"$PY" -c "from finetune.demo import ensure_demo_model; print('demo model:', ensure_demo_model())"

echo
du -sh .whl ckpts/demo
cat <<'MSG'

On the GPU machine (the device tool's `run`), with carry [".whl", "ckpts/demo"]:

    bash bench/gpu_run.sh --quick        # <= 3 minutes; then, if time is left:
    bash bench/gpu_run.sh                # the full run, <= 8 minutes

Its files come back from $OUT (checks.jsonl, table.txt, log.txt, console.txt); copy checks.jsonl's
lines into bench/results.jsonl and table.txt into docs/gpu.md.
MSG
