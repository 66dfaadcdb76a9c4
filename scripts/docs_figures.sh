#!/usr/bin/env bash
# Regenerate the README's figures (docs/figures/*.png) from a DEFAULT run of the pipeline on
# the synthetic data: params.yaml as shipped, except that data.source is forced to synthetic
# (no image derived from real data is ever committed) and the PNGs are drawn at DOCS_DPI.
#
#   scripts/docs_figures.sh            # ~2-4 minutes on a 2-core CPU
#
# It runs `dvc repro` in a throw-away copy of the pipeline, so your workspace, dvc.lock and
# DVC cache are untouched.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
dpi="${DOCS_DPI:-80}"
figures=(loss_history accuracy test_predictions train_images kernels max_pooling
         confusion_matrix filters most_confident_wrong)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$root/stages" "$root/dvc.yaml" "$root/params.yaml" "$root/production.yaml" "$work/"
cp "$root/.dvcignore" "$work/" 2>/dev/null || true
cd "$work"

"$python" - "$dpi" <<'PY'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["data"]["source"], p["data"]["path"] = "synthetic", "data/download"
p["plot"]["dpi"] = int(sys.argv[1])
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY

"$python" -m dvc init --no-scm -q
"$python" -m dvc repro

mkdir -p "$root/docs/figures"
for name in "${figures[@]}"; do
  # palette PNGs: a third of the bytes in git, no visible change for these figures
  "$python" -c 'import sys; from PIL import Image
im = Image.open(sys.argv[1]).convert("RGB")
im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)' \
    "reports/figures/$name.png" "$root/docs/figures/$name.png"
done
cat metrics/evaluate.json > "$root/docs/figures/evaluate.json"  # the numbers the README quotes
echo "wrote ${#figures[@]} figures to docs/figures (test accuracy: $("$python" -c \
  'import json; print(json.load(open("metrics/evaluate.json"))["test"]["accuracy"])'))"
