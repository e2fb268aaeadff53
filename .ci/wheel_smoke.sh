#!/usr/bin/env bash
# The package as a user gets it: `python -m build` makes the sdist and the wheel; the wheel must hold
# every file of the package that git tracks (package data: the frost photographs, their LICENSE and
# NOTICE); installed with the core dependencies only (torch pinned by constraints.txt, numpy) into
# a fresh virtual environment, `import otmdr` and an optimizer step work, `otmdr --help` prints the
# usage, and a command without the train extra is one line naming pip install 'otmdr[train]', exit 2.
# Everything happens in a temporary folder, removed at the end (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_PY=${BUILD_PY:-$ROOT/.venv/bin/python}  # has `build` (the test extra)
work=$(mktemp -d "${TMPDIR:-/tmp}/otmdr-wheel-smoke.XXXXXX")
leftovers=()  # what the build leaves in the source tree, removed unless it was there before
for path in build src/otmdr.egg-info; do [ -e "$path" ] || leftovers+=("$ROOT/$path"); done
trap 'rm -rf "$work" "${leftovers[@]}"' EXIT

echo "wheel smoke: building sdist and wheel"
"$BUILD_PY" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/otmdr-*.whl)
sdist=$(ls "$work"/dist/otmdr-*.tar.gz)
echo "wheel smoke: built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB), $(basename "$sdist") ($(du -k "$sdist" | cut -f1) KiB)"
"$BUILD_PY" - "$wheel" <<'EOF'
import subprocess, sys, zipfile
def tracked(folder):
    return subprocess.run(["git", "ls-files", folder], capture_output=True, text=True, check=True).stdout.split()
# the package's files, and the repository's assets/ as otmdr/assets/ (pyproject's package-dir)
wanted = {path.removeprefix("src/") for path in tracked("src/otmdr")} | {"otmdr/" + p for p in tracked("assets")}
have = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = sorted(wanted - have)
assert not missing, f"the wheel lacks package files: {missing} (add them to [tool.setuptools] packages or package-data)"
data = sorted(p for p in wanted if not p.endswith(".py"))
print(f"wheel smoke: the wheel holds all {len(wanted)} package files git tracks, data included: {data}")
EOF

echo "wheel smoke: installing the wheel with the core dependencies only"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet -c constraints.txt "$wheel" 2>&1 | grep -v "is ignored" || true
"$work/venv/bin/python" -c "import otmdr" || { echo "wheel smoke: the wheel did not install"; exit 1; }

cd "$work"  # away from the source tree: what runs is the installed wheel
"$work/venv/bin/python" - <<'EOF'
import importlib.util, sys
import torch
import otmdr
from otmdr import OTMDR
assert otmdr.__file__.startswith(sys.prefix), otmdr.__file__
from importlib.metadata import version
assert version("otmdr") == otmdr.__version__, (version("otmdr"), otmdr.__version__)  # one version
extras = [m for m in ("yaml", "sklearn", "scipy", "PIL", "tqdm", "matplotlib") if importlib.util.find_spec(m)]
assert not extras, f"core install holds optional packages {extras}"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
before = [p.detach().clone() for p in model.parameters()]
opt = OTMDR(model, torch.optim.SGD, lr=0.1)
result = opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), batch=(x, y))
assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
print(f"wheel smoke: import otmdr {otmdr.__version__} (torch {torch.__version__}), one OT-MDR step, loss {result.loss:.4f}")
EOF
"$work/venv/bin/otmdr" --help >"$work/help.txt"
grep -q "^usage: otmdr" "$work/help.txt"
echo "wheel smoke: otmdr --help ok"
for command in "train --config $ROOT/configs/demo.yaml --out $work/run" "eval $work/none.pt" "models"; do
  status=0
  # shellcheck disable=SC2086
  "$work/venv/bin/otmdr" $command >"$work/out.txt" 2>"$work/err.txt" || status=$?
  if [ "$status" != 2 ] || [ "$(wc -l <"$work/err.txt")" != 1 ] || ! grep -q "pip install 'otmdr\[train\]'" "$work/err.txt" \
     || [ -s "$work/out.txt" ] || [ -e "$work/run" ]; then
    echo "wheel smoke: otmdr ${command%% *} without the train extra: exit $status, expected 2 and one line:"
    cat "$work/out.txt" "$work/err.txt"
    exit 1
  fi
  echo "wheel smoke: otmdr ${command%% *} without extras -> exit 2: $(cat "$work/err.txt")"
done
echo "wheel smoke: passed"
