#!/usr/bin/env bash
# The API reference, generated from the docstrings with pdoc (pip install
# '.[docs]'): bash tools/api_docs.sh [OUT_DIR] (default docs/api). convkern.torch
# is documented where torch is installed. CI builds it so it cannot break.
set -euo pipefail
mkdir -p "${1:-docs/api}"
out="$(cd "${1:-docs/api}" && pwd)"
# packages bring their submodules; convkern itself lists only its names in __all__
modules=(convkern convkern.functional convkern.geometry convkern.arrays convkern.backend convkern.nn convkern.data
         convkern.app.metrics convkern.perf.bench convkern.perf.bench_net convkern.perf.gate convkern.perf.verify)
if python3 -c "import torch" 2>/dev/null; then
    modules+=(convkern.torch)
fi
# from outside the checkout: the installed package (with its compiled modules), not the source tree
cd "$(mktemp -d)"
python3 -m pdoc -o "$out" "${modules[@]}"
test -f "$out/convkern.html"
echo "API reference in $out/"
