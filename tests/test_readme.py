"""The README and its docs pages: every shell command they show runs as printed, or is
listed here with the reason it is not run (and the test that covers it).

The cheap commands run in the pages' order in one temporary copy of the pipeline with tiny
params, starting with the quick start's ``dvc repro``; where a page prints a command's
output, the parts that do not depend on timing or random weights are checked.
"""

from __future__ import annotations

import functools
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT, git, make_pipeline_repo, subprocess_env

#: The pages whose commands are accounted for here (README first: its order is the run order).
PAGES = ["README.md", "docs/data.md", "docs/training.md", "docs/results.md",
         "docs/orchestration.md", "docs/development.md", "docs/dvc-compat.md",
         "benchmarks/README.md"]

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_COMMENT = re.compile(r"\s+#\s.*$")  # a trailing `  # comment` (never inside these commands)


@dataclass(frozen=True)
class Shown:
    """One command a page shows, and the output lines it prints after it (console blocks)."""

    page: str
    command: str
    output: tuple[str, ...] = ()


def normalize(command: str) -> str:
    """A command without its trailing comment, whitespace collapsed."""
    return " ".join(_COMMENT.sub("", command).split())


def shown_commands(page: str) -> list[Shown]:
    """The commands of a page's ```bash blocks (each line) and ```console blocks (``$ ``)."""
    shown: list[Shown] = []
    for lang, body in _FENCE.findall((PROJECT / page).read_text(encoding="utf-8")):
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    shown.append(Shown(page, normalize(line)))
        elif lang == "console":
            command, output = None, []
            for line in [*body.splitlines(), "$ "]:
                if line.startswith("$ "):
                    if command:
                        shown.append(Shown(page, normalize(command), tuple(output)))
                    command, output = line[2:], []
                elif command is not None:
                    output.append(line)
    return shown


# ------------------------------------------------------------------- what is not run, and why
SKIPPED: dict[str, str] = {
    # set-up and the tests themselves
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch --index-url '
    'https://download.pytorch.org/whl/cpu && pip install -e ".[dev]"':
        "installs packages from the network; .ci/run installs the project the same way",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"':
        "installs packages from the network; .ci/run installs the project the same way",
    "python -m pytest": "the test suite itself",
    'python -m pytest -m "not slow"': "the test suite itself",
    "python -m pytest tests/test_train.py": "the test suite itself",
    # Prefect: servers and long-running processes
    "prefect server start": "a server that runs until stopped; tests/prefect_fixtures.py "
                            "starts the same command on a free port",
    "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api":
        "changes the user's Prefect profile",
    "python -m flows run": "needs a Prefect server: tests/test_flow_pipeline.py runs the flow "
                           "on this pipeline, tests/test_flow.py the CLI",
    'python -m flows serve --cron "0 3 * * *"': "serves until stopped: tests/test_flow_serve.py",
    "python -m flows sweep -S train.lr=0.01,0.003 --jobs 2": "needs a Prefect server: "
                                                             "tests/test_sweep.py",
    "python -m flows sweep -S train.epochs=1,3 --jobs 2": "needs a Prefect server: "
                                                          "tests/test_sweep.py",
    # error examples and remotes
    # docs/data.md: your own images, and cifar10 from the team's remote
    "tar czf data/my-images.tar.gz -C /somewhere train test": "a placeholder folder of the "
        "user's images: tests/test_versioned_data.py versions an imagefolder under dvc add",
    "dvc add data/my-images.tar.gz && git add data/my-images.tar.gz.dvc data/.gitignore":
        "part of the example above: tests/test_versioned_data.py",
    "dvc exp run -S data.source=imagefolder -S data.path=data/my-images.tar.gz":
        "part of the example above: tests/test_versioned_data.py",
    "dvc pull fetch": "needs a remote holding the cifar10 archive: "
                      "tests/test_versioned_data.py pulls it and runs offline",
    # docs/dvc-compat.md: trying another DVC release
    'pip install "dvc==3.68.0"': "installs another DVC release from the network",
    "python -m pytest tests/test_dvc_adapter.py -q": "the test suite itself",
    "python -m stages.ingest --out data/raw": "an error example (a corrupt archive): "
                                              "tests/test_ingest_bad_inputs.py",
    "echo $?": "part of the error example above",
    "dvc remote add -d storage /mnt/shared/convflow-dvc": "a folder that only exists on the "
                                                          "user's machine: tests/test_results.py "
                                                          "pushes to a folder remote",
    'git commit -m "DVC remote" .dvc/config': "part of the remote set-up above",
    "dvc push": "needs the remote above: tests/test_results.py",
    "git clone <repo-url> convflow && cd convflow": "a placeholder URL: tests/test_results.py "
                                                    "clones, pulls and checks dvc status",
    "dvc pull": "needs the remote above: tests/test_results.py",
}


# ----------------------------------------------------------------------------- what is run
@dataclass(frozen=True)
class Step:
    """A shown command run in the temp pipeline, with what its output must contain."""

    command: str
    expect: tuple[str, ...] = ()
    check_shown: bool = False  # the page's printed output lines must all appear
    before: Callable[[Path], None] | None = None
    after: Callable[[Path], None] | None = None
    check: Callable[[str, list[Shown]], None] | None = field(default=None)


def _commit(message: str) -> Callable[[Path], None]:
    def commit(repo: Path) -> None:
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", message)
    return commit


def _images(repo: Path) -> None:
    """The two image files the predict example names: a JPEG and an RGBA PNG of odd sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(repo / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8)).save(repo / "cat.png")


def _predict_lines_match(output: str, shown: list[Shown]) -> None:
    """One line per image as printed: ``<file>: <class> <p>, <class> <p>, <class> <p>``."""
    printed = [line for s in shown for line in s.output if line.strip()]
    actual = output.splitlines()
    assert len(actual) == len(printed), output
    for want, got in zip(printed, actual, strict=True):
        name = want.split(":")[0]
        assert re.fullmatch(rf"{re.escape(name)}: \S+ \d\.\d{{3}}(, \S+ \d\.\d{{3}}){{2}}",
                            got), (want, got)


def _fits_a_terminal(output: str, shown: list[Shown]) -> None:
    """DVC prints one table of every key of every metrics file: only headlines, <= 200 columns."""
    widest = max(output.splitlines(), key=len)
    assert len(widest) <= 200, f"{len(widest)} columns:\n{output}"


UP_TO_DATE = "Data and pipelines are up to date."
STEPS = [
    # README: the quick start
    Step("dvc repro", expect=("Running stage 'ingest'", "Running stage 'plot'")),
    Step("dvc metrics show", expect=("metrics/evaluate.json", "test.accuracy",
                                     "dvclive/train/metrics.json", "metrics/verdict.json"),
         check=_fits_a_terminal),
    Step("ls reports/figures", expect=("loss_history.png", "confusion_matrix.png")),
    Step("dvc repro", expect=(UP_TO_DATE,)),
    Step("dvc repro normalize", expect=("didn't change",)),  # docs/data.md
    Step("python -m stages.predict photo.jpg cat.png --top 3", before=_images,
         check=_predict_lines_match),
    # README: results and diffs, after a commit and an experiment that changed train.lr
    Step("dvc exp run -n lr-high -S train.lr=0.05", before=_commit("first run"),
         expect=("Running stage 'train'",)),
    Step("dvc exp show --drop '.*' --keep 'Experiment|train.lr$|test.accuracy'",
         expect=("lr-high", "0.05")),
    Step("dvc exp show --drop '.*' --keep 'Experiment|Created|train.lr$|test.accuracy|test.loss'",
         expect=("lr-high", "test.loss")),
    Step("dvc exp show", expect=("lr-high",)),
    Step("dvc exp apply lr-high", after=_commit("lr 0.05")),
    Step("dvc metrics diff HEAD~1 HEAD", expect=("dvclive/train/metrics.json", "HEAD~1")),
    Step("dvc params diff HEAD~1 HEAD", check_shown=True),
    Step("dvc plots diff HEAD~1 HEAD", expect=("index.html",)),
    Step("dvc plots show", expect=("index.html",)),
    Step("dvc status", check_shown=True),
]


#: Shown commands that a test of their own runs.
RUN_ELSEWHERE = {"ruff check .": "test_ruff_check_is_clean_as_printed"}


def _shown_everywhere() -> list[Shown]:
    return [s for page in PAGES for s in shown_commands(page)]


def test_every_command_shown_is_run_or_skipped_with_a_reason() -> None:
    shown = {s.command for s in _shown_everywhere()}
    run = {step.command for step in STEPS} | set(RUN_ELSEWHERE)
    unaccounted = sorted(shown - run - set(SKIPPED))
    assert not unaccounted, (
        f"commands shown in {PAGES} that tests/test_readme.py neither runs nor skips: "
        f"{unaccounted}; add each to STEPS (cheap) or SKIPPED (with the reason)")
    stale = sorted((run | set(SKIPPED)) - shown)
    assert not stale, f"tests/test_readme.py lists commands no page shows any more: {stale}"
    assert not run & set(SKIPPED), "a command is both run and skipped"


def test_shown_commands_parse_both_block_kinds() -> None:
    """The parser finds bash lines (comments dropped) and console prompts with their output."""
    readme = shown_commands("README.md")
    assert readme[2].command == "dvc repro"  # after the two set-up lines of the quick start
    results = shown_commands("docs/results.md")
    [params_diff] = [s for s in results if s.command.startswith("dvc params diff") and s.output]
    assert params_diff.output[0].split() == ["Path", "Param", "HEAD~1", "HEAD"]


@pytest.mark.slow  # two tiny pipeline runs and 14 dvc commands: ~38 s of CPU on 2 cores
def test_readme_commands_run_as_printed(tmp_path: Path) -> None:
    """The quick start and every cheap command, in order, in a temp copy of the pipeline."""
    repo = make_pipeline_repo(tmp_path / "repo")
    shown = _shown_everywhere()
    for step in STEPS:
        if step.before:
            step.before(repo)
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", step.command], cwd=repo, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        # shown by pytest when a later step fails
        print(f"$ {step.command}    # {time.perf_counter() - t0:.1f} s\n{out}")
        assert proc.returncode == 0, f"{step.command!r} exited {proc.returncode}:\n{out}"
        for text in step.expect:
            assert text in out, f"{step.command!r} did not print {text!r}:\n{out}"
        printed = [s for s in shown if s.command == step.command and s.output]
        if step.check_shown:
            assert printed, f"no page prints the output of {step.command!r}"
            got = {" ".join(line.split()) for line in out.splitlines()}
            for s in printed:
                for line in s.output:
                    assert " ".join(line.split()) in got, (
                        f"{s.page} prints {line!r} for {step.command!r}; it printed:\n{out}")
        if step.check:
            step.check(proc.stdout, printed)
        if step.after:
            step.after(repo)


def test_ruff_check_is_clean_as_printed() -> None:
    """docs/development.md's lint command passes on this checkout."""
    ruff = subprocess.run(["bash", "-c", "command -v ruff"], env=subprocess_env(),
                          capture_output=True, text=True)
    if ruff.returncode != 0:
        pytest.skip("ruff is not installed (pip install -e '.[dev]' installs it)")
    proc = subprocess.run(["bash", "-c", "ruff check ."], cwd=PROJECT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_relative_links_resolve() -> None:
    """Every relative link and image in the pages points at a file of this checkout."""
    link = re.compile(r"\]\(([^)\s]+)\)")
    broken = []
    for page in PAGES:
        path = PROJECT / page
        for target in link.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            dest = path.parent / file if file else path
            if not dest.exists():
                broken.append(f"{page}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, broken


@functools.cache  # one read per page, however many links point at it
def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as -."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
