"""Mutation check: deliberately break the engine and make sure the tests notice.

For each mutation in MUTATIONS the repository's files (``git ls-files``: tracked plus untracked, not
ignored, as they are in the working tree now) are copied to a fresh temporary directory, the ``old`` string
(which must occur exactly once in ``path``) is replaced by ``new`` there, and the mutation's tests are run
there with ``python -m pytest -q -x -p no:cacheprovider`` and PYTHONPATH pointing at the copy, so the
copy's ``detox_tui`` is the one imported (checked before the tests run). Tests failing = "killed";
tests passing = "SURVIVED". Before the mutants, the same tests run once on an unmutated copy (skip with
--no-baseline): a mutant only counts as killed if its tests pass without the mutation.

    python benchmarks/mutations.py                 # every mutation; a table on stdout
    python benchmarks/mutations.py --list          # names, files, tests; checks each old string occurs once
    python benchmarks/mutations.py --only aura-labels-swapped --json   # + benchmarks/results/mutations.json

Exit status: 1 if any mutation survived, else 2 if any could not be run (old string not found exactly
once, the copy's package not imported, the baseline failing, a pytest usage error or timeout), else 0.

To add a mutation, append a ``Mutation`` (or a dict with the same keys) to MUTATIONS. Select specific
tests (node ids) so that each run stays short; the fastest test that should fail goes first (-x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "mutations.json"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: Sequence[str]  # pytest node ids or files, relative to the repository root
    why: str = ""


AURA_WIRED = (
    "tests/test_aura.py::"
    "test_units_firing_on_toxic_text_are_dampened_and_units_firing_on_nontoxic_text_are_not"
)
AURA_POSITIVE = "tests/test_aura.py::test_expertise_ranks_toxic_as_the_positive_class_on_the_trained_model"
DINM_LOCATE = (
    "tests/test_dinm.py::test_locate_finds_the_layer_where_safe_and_unsafe_hidden_states_differ_most"
)
DINM_KL = "tests/test_dinm.py::test_kl_term_keeps_neutral_next_token_distributions_closer"

MUTATIONS: list[Mutation | dict] = [
    Mutation(
        name="aura-labels-swapped",
        path="detox_tui/backends/editing/aura.py",
        old="labels = torch.tensor([True] * len(toxic) + [False] * len(nontoxic))",
        new="labels = torch.tensor([False] * len(toxic) + [True] * len(nontoxic))",
        tests=[AURA_WIRED, AURA_POSITIVE],
        why="AUROC with non-toxic as the positive class: the units that fire on non-toxic text get dampened",
    ),
    Mutation(
        name="dinm-locate-layer-0",
        path="detox_tui/backends/editing/dinm.py",
        old="layer = max(range(len(distances)), key=lambda i: distances[i])",
        new="layer = 0",
        tests=[DINM_LOCATE],
        why="the locator ignores the safe/unsafe distances and always picks the first block",
    ),
    Mutation(
        name="dinm-kl-sign-flipped",
        path="detox_tui/backends/editing/dinm.py",
        old="loss = nll_weight * nll + kl_weight * kl",
        new="loss = nll_weight * nll - kl_weight * kl",
        tests=[DINM_KL],
        why="the KL term pushes the neutral prompts' distributions away from the original model",
    ),
    Mutation(
        name="dinm-kl-removed",
        path="detox_tui/backends/editing/dinm.py",
        old="loss = nll_weight * nll + kl_weight * kl",
        new="loss = nll_weight * nll",
        tests=[DINM_KL],
        why="kl_weight has no effect: nothing keeps the neutral prompts in place",
    ),
    Mutation(
        name="zero-edit",
        path="detox_tui/backends/editing/base.py",
        old="p.copy_((p.to(torch.float32) + delta.to(p.device, torch.float32)).to(p.dtype))",
        new="p.copy_((p.to(torch.float32) + 0 * delta.to(p.device, torch.float32)).to(p.dtype))",
        tests=[AURA_WIRED, DINM_KL],
        why="EditDelta.apply adds nothing: every edit of every method is a no-op",
    ),
    Mutation(
        name="trace-noise-10x-smaller",
        path="detox_tui/backends/tracing.py",
        old="noise_draws = torch.randn(samples, len(corrupt_pos), lm.d_model, generator=gen) * level",
        new="noise_draws = torch.randn(samples, len(corrupt_pos), lm.d_model, generator=gen) * (level / 10)",
        tests=["tests/test_tracing.py::test_noise_is_three_times_the_std_of_the_subject_token_embeddings"],
        why="the corruption is 0.3 x (not 3 x) the subject tokens' embedding std; the recorded level is unchanged",
    ),
    Mutation(
        name="trace-window-ignored",
        path="detox_tui/backends/tracing.py",
        old='(window_layers(layer, window, n_layers) if kind != "hidden" else [layer])',
        new="([layer])",
        tests=["tests/test_tracing.py::test_window_restores_that_many_layers_around_each_cell"],
        why="mlp/attn tracing restores only the centre layer of each cell instead of `window` layers",
    ),
    Mutation(
        name="verdict-any-drop-counts",
        path="detox_tui/pipeline/verdicts.py",
        old='    return Verdict(reduction, p, went_down, reason == "detoxified", reason)',
        new="    return Verdict(reduction, p, went_down, went_down and not collapsed, reason)",
        tests=[
            "tests/test_verdicts.py::test_a_change_in_the_fifth_decimal_is_not_detoxified",
            "tests/test_verdicts.py::test_a_zero_edit_detoxifies_nothing_and_names_every_request",
        ],
        why="the notebooks' error: a prompt counts as detoxified whenever its mean went down at all",
    ),
    Mutation(
        name="verdict-no-significance",
        path="detox_tui/pipeline/verdicts.py",
        old="    elif p is None or p >= alpha:",
        new="    elif False:",
        tests=[
            "tests/test_verdicts.py::test_three_samples_can_never_be_significant_and_collapse_always_loses"
        ],
        why="a large but noisy drop counts without the paired test",
    ),
    Mutation(
        name="verdict-ignores-convergence",
        path="detox_tui/pipeline/experiment.py",
        old="    if detoxified and converged is False:",
        new="    if False:",
        tests=["tests/test_verdicts.py::test_a_drop_without_the_edit_reaching_its_target_is_not_counted"],
        why="a prompt whose own edit never reached its target still counts as detoxified",
    ),
    Mutation(
        name="converged-per-token-not-sequence",
        path="detox_tui/pipeline/records.py",
        old="            return logp_after * n_tokens > rival_after * rival_n_tokens",
        new="            return logp_after > rival_after",
        tests=["tests/test_verdicts.py::test_reached_rules"],
        why="the target is compared per token with an insult whose later tokens are near-certain",
    ),
    Mutation(
        name="alphaedit-no-projection",
        path="detox_tui/backends/editing/alphaedit.py",
        old="                    projector = spaces[layer].projector.to(dev)  # one layer's P on the device at a time",
        new="                    projector = torch.eye(d_mlp, dtype=torch.float64, device=dev)",
        tests=["tests/test_alphaedit.py::test_the_delta_is_the_papers_formula"],
        why="AlphaEdit without its null-space projection: an unprotected MEMIT-like update with an L2 prior",
    ),
    Mutation(
        name="alphaedit-memory-ignored",
        path="detox_tui/backends/editing/alphaedit.py",
        old="                        previous[layer] = keys if prior is None else torch.cat([prior, keys])",
        new="                        previous[layer] = None",
        tests=["tests/test_alphaedit.py::test_sequential_batches_accumulate_the_keys_of_earlier_batches"],
        why="sequential batches forget the keys already written, so later batches may overwrite them",
    ),
    Mutation(
        name="rect-keeps-the-smallest",
        path="detox_tui/backends/editing/rect.py",
        old="mask[torch.topk(ratio, k, sorted=False).indices] = True",
        new="mask[torch.topk(-ratio, k, sorted=False).indices] = True",
        tests=["tests/test_rect.py"],
        why="RECT keeps the smallest relative changes instead of the largest",
    ),
]


def as_mutation(entry: Mutation | Mapping) -> Mutation:
    return entry if isinstance(entry, Mutation) else Mutation(**dict(entry))


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode("utf-8")
    return sorted({f for f in out.split("\0") if f})


def copy_repo(root: Path, files: Sequence[str], prefix: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix=prefix))
    for rel in files:
        src = root / rel
        if not (src.is_file() or src.is_symlink()):  # tracked but deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    return dest


def occurrences(root: Path, m: Mutation) -> int:
    path = root / m.path
    return path.read_text(encoding="utf-8").count(m.old) if path.is_file() else -1


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(copy), env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def imported_from(copy: Path) -> str:
    """Where ``import detox_tui`` resolves with the copy's environment (must be inside the copy)."""
    res = subprocess.run(
        [sys.executable, "-c", "import detox_tui; print(detox_tui.__file__)"],
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
    )
    return res.stdout.strip() if res.returncode == 0 else f"<import failed: {res.stderr.strip()[-300:]}>"


def run_pytest(copy: Path, tests: Sequence[str], timeout: float) -> tuple[int | None, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out, time.perf_counter() - start
    return res.returncode, res.stdout + res.stderr, time.perf_counter() - start


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:200]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def check_import(copy: Path) -> str | None:
    where = imported_from(copy)
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        return f"detox_tui is imported from {where}, not from the copy {copy}"
    return None


def run_baseline(
    root: Path, files: Sequence[str], mutations: Sequence[Mutation], timeout: float
) -> str | None:
    tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
    copy = copy_repo(root, files, "mut-baseline-")
    try:
        if problem := check_import(copy):
            return problem
        rc, out, secs = run_pytest(copy, tests, timeout)
        print(
            f"baseline (no mutation): {len(tests)} test selection(s), rc {rc}, {secs:.1f}s", file=sys.stderr
        )
        if rc != 0:
            return f"the tests fail without any mutation (rc {rc}): {first_failure(out)}"
        return None
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def run_mutation(root: Path, files: Sequence[str], m: Mutation, timeout: float, keep: bool) -> dict:
    result = {
        **dataclasses.asdict(m),
        "tests": list(m.tests),
        "status": "error",
        "detail": "",
        "seconds": 0.0,
    }
    n = occurrences(root, m)
    if n != 1:
        result["detail"] = (
            f"{m.path} does not exist" if n < 0 else f"the old string occurs {n} times in {m.path}, not once"
        )
        return result
    copy = copy_repo(root, files, f"mut-{m.name}-")
    try:
        target = copy / m.path
        target.write_text(target.read_text(encoding="utf-8").replace(m.old, m.new, 1), encoding="utf-8")
        if problem := check_import(copy):
            result["detail"] = problem
            return result
        rc, out, secs = run_pytest(copy, m.tests, timeout)
        result["seconds"] = round(secs, 1)
        result["returncode"] = rc
        if rc is None:
            result["detail"] = f"timed out after {timeout:.0f}s"
        elif rc == 0:
            result["status"] = "SURVIVED"
            result["detail"] = f"all selected tests passed: {' '.join(m.tests)}"
        elif rc in (
            1,
            2,
        ):  # 1: tests failed; 2: interrupted by a collection error (the mutant breaks imports)
            result["status"] = "killed"
            result["detail"] = first_failure(out)
        else:  # 3 internal error, 4 usage error (e.g. unknown node id), 5 no tests collected
            result["detail"] = f"pytest exit code {rc}: {first_failure(out)}"
        return result
    finally:
        if keep:
            result["copy"] = str(copy)
        else:
            shutil.rmtree(copy, ignore_errors=True)


def print_table(rows: Sequence[dict]) -> None:
    headers = ("mutation", "file", "result", "seconds", "detail")
    table = [
        (
            r["name"],
            r["path"],
            r["status"],
            f"{r['seconds']:.1f}",
            r["detail"].split(" - ")[0].replace("|", "/"),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers[:-1])]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, [*widths, 0])) + " |")
    print("|" + "|".join("-" * (w + 2) for w in [*widths, len(headers[-1])]) + "|")
    for row in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, [*widths, 0])) + " |")


def git_commit(root: Path) -> str | None:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return res.stdout.strip() or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and check their old strings")
    parser.add_argument(
        "--json",
        nargs="?",
        const=str(DEFAULT_JSON),
        metavar="PATH",
        help=f"also write the results as JSON (default {DEFAULT_JSON.relative_to(ROOT)})",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the same tests")
    parser.add_argument(
        "--keep", action="store_true", help="keep the mutated copies (their paths are reported)"
    )
    args = parser.parse_args(argv)

    mutations = [as_mutation(e) for e in MUTATIONS]
    names = [m.name for m in mutations]
    if len(set(names)) != len(names):
        parser.error(f"duplicate mutation names in MUTATIONS: {names}")
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown mutation(s) {unknown}; --list shows them")
        mutations = [m for m in mutations if m.name in args.only]

    if args.list:
        bad = 0
        for m in mutations:
            n = occurrences(ROOT, m)
            ok = "ok" if n == 1 else ("MISSING FILE" if n < 0 else f"OLD STRING FOUND {n} TIMES")
            bad += n != 1
            print(f"{m.name}  [{ok}]\n  {m.path}: {m.old!r} -> {m.new!r}\n  tests: {' '.join(m.tests)}")
            if m.why:
                print(f"  why: {m.why}")
        return 2 if bad else 0

    files = repo_files(ROOT)
    baseline_problem = None if args.no_baseline else run_baseline(ROOT, files, mutations, args.timeout)
    rows = []
    for m in mutations:
        if baseline_problem:
            row = {**dataclasses.asdict(m), "tests": list(m.tests), "status": "error", "seconds": 0.0}
            row["detail"] = f"baseline: {baseline_problem}"
        else:
            print(f"mutation {m.name} ...", file=sys.stderr, flush=True)
            row = run_mutation(ROOT, files, m, args.timeout, args.keep)
            print(f"  {row['status']} ({row['seconds']:.1f}s) {row['detail']}", file=sys.stderr, flush=True)
        rows.append(row)
    print_table(rows)

    survived = [r["name"] for r in rows if r["status"] == "SURVIVED"]
    errors = [r["name"] for r in rows if r["status"] == "error"]
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "commit": git_commit(ROOT),
            "note": "working-tree files as they were when the run started (uncommitted changes included)",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "baseline": "skipped" if args.no_baseline else (baseline_problem or "passed"),
            "killed": sum(r["status"] == "killed" for r in rows),
            "survived": survived,
            "errors": errors,
            "mutations": rows,
        }
        out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    if survived:
        print(f"SURVIVED: {', '.join(survived)}")
        return 1
    if errors:
        print(f"could not run: {', '.join(errors)}")
        return 2
    print(f"all {len(rows)} mutation(s) killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
