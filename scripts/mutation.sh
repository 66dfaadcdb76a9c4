#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules that decide things, each against its own tests.
#
#   scripts/mutation.sh                      # all modules below
#   scripts/mutation.sh stages/gate.py       # one (or several)
#
# Each module runs in a copy of the working tree (under $MUTATION_DIR, default
# /tmp/convflow-mutation), so nothing is written here; niced, 2 workers. Prints one line per
# module (killed/total) and the total score; `cd $MUTATION_DIR/<module> && mutmut results`
# lists the survivors, `mutmut show <name>` shows one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[[ -x .venv/bin/mutmut ]] && PATH="$ROOT/.venv/bin:$PATH"  # the project venv, if not active
OUT=${MUTATION_DIR:-/tmp/convflow-mutation}
JOBS=${MUTATION_JOBS:-2}

# module -> the fast tests that decide its mutants (space-separated pytest ids)
declare -A TESTS=(
  [stages/gate.py]="tests/test_decisions.py tests/test_decisions_stages.py tests/test_guardrails.py"
  [stages/params.py]="tests/test_decisions.py tests/test_decisions_stages.py tests/test_params.py"
  [stages/data_report.py]="tests/test_decisions.py tests/test_decisions_stages.py"
  [stages/sources/safety.py]="tests/test_decisions.py tests/test_decisions_stages.py
                              tests/test_decisions_safety.py tests/test_ingest_cifar10.py"
  [flows/publish.py]="tests/test_decisions.py tests/test_decisions_flows.py
                       tests/test_decisions_publish.py"
  [flows/results_branch.py]="tests/test_decisions.py tests/test_decisions_flows.py
                             tests/test_decisions_results.py"
  [flows/slots.py]="tests/test_decisions.py tests/test_decisions_slots.py"
  [flows/registry.py]="tests/test_decisions.py tests/test_decisions_registry.py"
)
ORDER=(stages/gate.py stages/params.py stages/data_report.py stages/sources/safety.py
       flows/publish.py flows/results_branch.py flows/slots.py flows/registry.py)
MODULES=("${@:-${ORDER[@]}}")

toml_list() { printf '"%s", ' "$@" | sed 's/, $//'; }

killed_all=0; total_all=0
for module in "${MODULES[@]}"; do
  [[ -n "${TESTS[$module]:-}" ]] || { echo "mutation.sh: error: no tests listed for $module" >&2; exit 2; }
  work="$OUT/${module//\//_}"
  rm -rf "$work" && mkdir -p "$work"
  git ls-files -co --exclude-standard -- stages flows tests pyproject.toml dvc.yaml params.yaml \
      production.yaml .gitignore .dvcignore | while read -r f; do [[ -f $f ]] && echo "$f"; done \
    | tar -cf - -T - | tar -xf - -C "$work"
  # this run's settings replace pyproject's [tool.mutmut] (the defaults for a plain `mutmut run`);
  # -n 0: no xdist workers (pyproject's addopts start them; mutmut's stats and workers need one process)
  python - "$work/pyproject.toml" "$module" ${TESTS[$module]} <<'PY'
import json, re, sys
path, module, *tests = sys.argv[1:]
text = open(path).read()
text = re.sub(r"\n\[tool\.mutmut\].*?(?=\n\[|\Z)", "", text, flags=re.S)
settings = {"source_paths": ["stages", "flows"], "only_mutate": [module],
            "pytest_add_cli_args_test_selection": tests,
            "pytest_add_cli_args": ["-p", "no:cacheprovider", "-m", "not slow", "-n", "0"],
            "also_copy": ["dvc.yaml", "params.yaml", "production.yaml", ".gitignore", ".dvcignore"]}
text += "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
open(path, "w").write(text)
PY
  (cd "$work" && OMP_NUM_THREADS=1 nice -n 10 mutmut run --max-children "$JOBS" >run.log 2>&1 \
     || { tail -20 run.log >&2; echo "mutation.sh: error: mutmut failed on $module" >&2; exit 1; }
   mutmut export-cicd-stats >/dev/null)
  read -r killed total < <(python -c 'import json,sys; s=json.load(open(sys.argv[1]))
print(s["killed"] + s["timeout"] + s["segfault"], s["total"] - s["skipped"])' \
    "$work/mutants/mutmut-cicd-stats.json")
  printf '%-28s %4d / %4d killed\n' "$module" "$killed" "$total"
  killed_all=$((killed_all + killed)); total_all=$((total_all + total))
done
python -c "import sys; k, t = map(int, sys.argv[1:]); print(f'total {k} / {t} killed: {100 * k / max(t, 1):.1f} %')" \
  "$killed_all" "$total_all"
