#!/usr/bin/env bash
# What bench/gpu.sh needs on the GPU machine and its image lacks, fetched here (where pip reaches
# PyPI) into .whl/ (ignored by git), for CPython 3.12 on manylinux x86-64, pinned to the
# versions in constraints.txt (the project's lock):
#
#   bench/gpu_wheels.sh            # the wheels (~47 MB) and the Gemma 3 tokenizer (3.5 MB)
#   bench/gpu_wheels.sh --ray      # also ray (79 MB) in .whl-ray/1 and 2, cut in two (50 MiB + 26 MiB)
#
# The image (/work/.library/device/KINDS.md) has torch, transformers, numpy, pyarrow, pandas,
# huggingface-hub, safetensors, tokenizers, sentencepiece, accelerate, einops, jaxtyping, rich,
# typer, scikit-learn, scipy, xxhash, fsspec, pytest and pytest-timeout. saecat imports, beyond
# those: duckdb, faiss, sqlglot, pytz, sae-lens, transformer-lens and datasets; and at their
# import: dill and multiprocess (datasets), better-abc (transformer-lens), simple-parsing and
# docstring-parser (sae-lens). sae-lens also imports wandb (20 MB and a dozen dependencies), only
# to train: bench/gpu.sh puts an empty stand-in on the path instead (bench/gpu_stubs/).
# Requirements these wheels declare but nothing imports on the way to an ingestion (plotly,
# nltk, babe, beartype, fancy-einsum, typeguard, wandb, transformers-stream-generator, tenacity,
# python-dotenv) are not carried; the check at the end lists them.
#
# faiss-gpu is not carried: faiss-gpu 1.15.1 (135 MB) links libcudart.so.12, libcublas.so.12 and
# libcublasLt.so.12 by versioned symbols, and the image is CUDA 13 (torch cu130); the CUDA 12
# cuBLAS wheel it requires (nvidia-cublas-cu12 12.9.3.13) is 581 MB, ten calls of 60 MiB.
#
# The tokenizer: the real Gemma 3 tokenizer, exported from the demo's GGUF (the `demo` extra,
# as `make main` installs it) with transformers, as tokenizer.json + tokenizer_config.json in
# .whl/gemma3-270m-tokenizer.tar.xz, so the random model of bench/gpu_model.py cuts documents
# into the demo's tokens. Without the demo extra it is left out and gpu.sh trains a BPE there.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DEST=$ROOT/.whl
RAY=0
for arg in "$@"; do
  case $arg in
    --ray) RAY=1 ;;
    *) echo "usage: bench/gpu_wheels.sh [--ray]" >&2; exit 2 ;;
  esac
done

WHEELS=(duckdb faiss-cpu sqlglot pytz sae-lens transformer-lens datasets dill multiprocess better-abc simple-parsing
        docstring_parser)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

pinned() {  # NAME -> NAME==VERSION from constraints.txt (names compared as pip does: case, - and _ alike)
  local pattern
  pattern=$(echo "$1" | sed 's/[-_.]/[-_.]/g')
  local line
  line=$(grep -i -E "^${pattern}==" "$ROOT/constraints.txt" | head -1)
  [[ -n $line ]] || { echo "gpu_wheels.sh: $1 is not in constraints.txt" >&2; exit 1; }
  echo "$line"
}

download() {  # DIR SPEC...
  local dir=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dir" "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two stop the whole install there
# Ignored by git, so that they travel to the GPU machine only in the calls that carry them.
exclude=$(cd "$ROOT" && git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$ROOT/$exclude")"
for path in /.whl/ /.whl-ray/; do
  grep -qxF "$path" "$ROOT/$exclude" 2>/dev/null || echo "$path" >>"$ROOT/$exclude"
done
specs=()
for w in "${WHEELS[@]}"; do specs+=("$(pinned "$w")"); done
echo "downloading ${specs[*]}" >&2
download "$DEST" "${specs[@]}"

if [[ ! -e $DEST/gemma3-270m-tokenizer.tar.xz ]]; then
  tmp=$(mktemp -d)
  if "$PY" - "$tmp" <<'EOF'
import sys
from demo.gemma import gguf_path
from transformers import AutoTokenizer

path = gguf_path()
AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(sys.argv[1])
EOF
  then
    tar -C "$tmp" -cf - tokenizer.json tokenizer_config.json | xz -6 -T2 >"$DEST/gemma3-270m-tokenizer.tar.xz"
  else
    echo "gpu_wheels.sh: no demo GGUF here (pip install -e '.[demo]'): gpu.sh will train a BPE instead" >&2
  fi
  rm -rf "$tmp"
fi

if ((RAY)); then
  # ray and what it imports that the image lacks (jsonschema's family). Ray's wheel is cut in two
  # so that each part and the working tree (9 MiB) fit one call: .whl-ray/1/ holds 50 MiB of it,
  # .whl-ray/2/ the rest, its file name (NAME) and the other wheels.
  rm -rf "$ROOT/.whl-ray"
  mkdir -p "$ROOT/.whl-ray/1" "$ROOT/.whl-ray/2"
  download "$ROOT/.whl-ray/2" "$(pinned ray)" "$(pinned jsonschema)" "$(pinned jsonschema-specifications)" \
    "$(pinned referencing)" "$(pinned rpds-py)"
  (cd "$ROOT/.whl-ray/2" && ls ray-*.whl >NAME && split -b 50M -d ray-*.whl ray.whl.part- && rm ray-*.whl \
    && mv ray.whl.part-00 ../1/)
  ls -l "$ROOT/.whl-ray/1" "$ROOT/.whl-ray/2" >&2
fi

# What each wheel requires (markers for CPython 3.12 on Linux), against the image and the wheels here.
"$PY" - "$DEST" "${KINDS:-/work/.library/device/KINDS.md}" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

dest, kinds = Path(sys.argv[1]), Path(sys.argv[2])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = set()
if kinds.is_file():
    line = [l for l in kinds.read_text().splitlines() if l.startswith("nvidia-h100-x1, nvidia-h200: their image")][0]
    image = {norm(n.strip()) for n in line.split("Packages:")[1].rstrip(".").split(",")}
here = {norm(w.name.split("-")[0]) for w in dest.glob("*.whl")}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "os_name": "posix", "extra": ""}
missing = {}
for wheel in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if (req.marker is None or req.marker.evaluate(env)) and norm(req.name) not in image | here:
                missing.setdefault(norm(req.name), []).append(wheel.name.split("-")[0])
total = sum(w.stat().st_size for w in dest.iterdir() if w.is_file())
print(f"{len(list(dest.glob('*.whl')))} wheels and the tokenizer in {dest}: {total / 2**20:.1f} MiB")
print("declared but in neither the image nor .whl/ (not imported on saecat's paths; wandb is stubbed):")
for name, by in sorted(missing.items()):
    print(f"  {name} (by {', '.join(by)})")
EOF
tree=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "working tree ${tree} bytes + .whl/: the device call carries both, 64 MiB at most" >&2
