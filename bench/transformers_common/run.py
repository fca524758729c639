"""transformers' own common model tests against our model, with stock GPT-2 as the control.

    python bench/transformers_common/run.py                  # the installed transformers' tests, all classes
    python bench/transformers_common/run.py -k batching      # extra pytest arguments go through
    python bench/transformers_common/run.py --tests-from ~/src/transformers   # a git checkout of the same tag
    git -C ~/src/transformers archive v5.25.0 tests | tar -x -C /tmp/tf-tests   # or only its tests/, of the tag
    python bench/transformers_common/run.py --tests-from /tmp/tf-tests
    git show REV:modeling_gpt2_repro.py > /tmp/old/modeling_gpt2_repro.py
    python bench/transformers_common/run.py --model-from /tmp/old           # another revision of the model

What it does:
1. fetches the installed release's source distribution once, with pip (`pip download transformers==<version>
   --no-deps --no-binary :all:`), into bench/transformers_common/.cache/ (git-ignored);
2. extracts its tests/ folder (or, with --tests-from, copies a checkout's tests/, which is complete) into
   .cache/suite-<version>/tests/. The PyPI source distribution carries test_modeling_common.py (ModelTesterMixin),
   test_configuration_common.py (ConfigTester) and test_training_mixin.py, but not the modules they import from
   sub-folders (generation/test_utils.py with GenerationTesterMixin, exporters/test_export.py,
   utils/test_configuration_utils.py) nor causal_lm_tester.py. Each missing one gets a stand-in, said in the
   summary: an empty mixin (those tests do not run), and a list of common config keyword arguments;
   .cache/suite-<version>/src/transformers links to the installed package, which test_pipeline_mixin.py (imported
   by causal_lm_tester.py) reads as a checkout's src/ (as in an editable install of the checkout);
3. copies adapter.py there as test_gpt2_repro_common.py (our classes with an unpadded and a padded vocabulary, and
   stock GPT2Model / GPT2LMHeadModel through the same adapter) and runs pytest on it, offline, with
   `-p no:cacheprovider` and a pytest.ini of its own (the project's pytest settings do not apply there). With a
   checkout's tests (causal_lm_tester.py there) each class is a transformers CausalLMModelTest, as transformers'
   decoder models are tested: its causal-LM tests, GenerationTesterMixin and PipelineTesterMixin run too;
4. prints, from pytest's JUnit XML, the counts per class and the tests our classes fail that the control passes.
   That list must be empty: the exit status is 1 otherwise (2 when pytest could not run).

Not part of the project's test suite: pytest's testpaths is tests/, and nothing here is named test_*.py (the suite
is written under .cache/, which pytest never enters).

Needs, beyond the project's dependencies: pytest, parameterized (imported by transformers' test modules).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = HERE / ".cache"
OURS = ("GPT2ReproUnpaddedTest", "GPT2ReproPaddedTest")
CONTROL = "StockGPT2ControlTest"

# Stand-ins for what the source distribution lacks. Each is what the importing module needs and nothing more.
STAND_INS = {
    "generation/test_utils.py": '''"""Stand-in (the source distribution lacks this file): no generation test runs."""


class GenerationTesterMixin:
    is_stand_in = True
''',
    "exporters/test_export.py": '''"""Stand-in (the source distribution lacks this file): no export test runs."""


class ExportTesterMixin:
    is_stand_in = True
''',
    "utils/test_configuration_utils.py": '''"""Stand-in (the source distribution lacks this file).

ConfigTester.check_config_arguments_init builds a config from these and checks every value was kept: keyword
arguments of the base PreTrainedConfig, each set to a value other than its default.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
    # test_pipeline_mixin.py reads it on import: the Hub's tiny model of each architecture. Empty, no pipeline test
    # finds a model (they skip); a checkout's lists GPT2Model, whose pipeline tests then skip offline.
    "utils/tiny_model_summary.json": "{}\n",
}

PYTEST_INI = """[pytest]
addopts = -p no:cacheprovider -q -rfEs
filterwarnings =
    ignore::DeprecationWarning
    ignore::pytest.PytestUnknownMarkWarning
"""


def fetch_sdist(version: str) -> Path:
    sdist = CACHE / f"transformers-{version}.tar.gz"
    if not sdist.exists():
        print(f"downloading the transformers {version} source distribution (once) into {CACHE}")
        cmd = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-deps"]
        subprocess.run([*cmd, "--no-binary", ":all:", "--dest", str(CACHE)], check=True)
    return sdist


def build_suite(version: str, tests_from: Path | None) -> tuple[Path, list[str]]:
    """The tests folder, ready to run: (its path, the stand-ins written into it)."""
    import transformers

    CACHE.mkdir(parents=True, exist_ok=True)
    # git and ruff skip the folder even where the project's .gitignore does not name it (pytest never enters it)
    (CACHE / ".gitignore").write_text("*\n")
    suite = CACHE / f"suite-{version}"
    tests = suite / "tests"
    if suite.exists():
        shutil.rmtree(suite)  # rebuilt every run: cheap, and never stale after an upgrade
    if tests_from is not None:
        init = tests_from / "src" / "transformers" / "__init__.py"  # a whole checkout: say when its release differs
        found = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M) if init.is_file() else None
        if found and found[1] != version:
            print(f"warning: {tests_from} is transformers {found[1]}, installed {version}: check out v{version}")
        shutil.copytree(tests_from / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(fetch_sdist(version)) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(tests, members=members, filter="data")
    stand_ins = []
    for rel, text in STAND_INS.items():
        if not (tests / rel).exists():
            (tests / rel).parent.mkdir(parents=True, exist_ok=True)
            (tests / rel).write_text(text)
            stand_ins.append(rel)
    # transformers' test modules import each other relatively: every folder must be a package.
    for folder in [tests, *[p for p in tests.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    # A checkout's src/: the installed transformers, the one under test (the checkout's own src/ is not used).
    (suite / "src").mkdir()
    (suite / "src" / "transformers").symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
    shutil.copy(HERE / "adapter.py", tests / "test_gpt2_repro_common.py")
    (suite / "pytest.ini").write_text(PYTEST_INI)
    return suite, stand_ins


def read_junit(path: Path) -> dict[str, dict[str, str]]:
    """{class name: {test name: "passed" | "failed" | "skipped"}}, errors counted as failures."""
    results: dict[str, dict[str, str]] = defaultdict(dict)
    for case in ET.parse(path).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                break
            if child.tag == "skipped":
                outcome = "skipped"
        # A test can report twice (an error in teardown after a pass): keep the worst outcome.
        if results[cls].get(case.get("name")) != "failed":
            results[cls][case.get("name")] = outcome
    return results


def summarize(results: dict[str, dict[str, str]], stand_ins: list[str], version: str, suite: Path) -> int:
    print(f"\ntransformers {version} common model tests (stand-ins for missing modules: {stand_ins or 'none'})")
    if (suite / "tests" / "causal_lm_tester.py").is_file():
        print("each class a transformers CausalLMModelTest (causal_lm_tester.py), with TrainingTesterMixin")
    else:
        print("no causal_lm_tester.py: the adapter's own tester, ModelTesterMixin, GenerationTesterMixin, training")
    print(f"{'class':<24}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for cls in (*OURS, CONTROL):
        counts = defaultdict(int)
        for outcome in results.get(cls, {}).values():
            counts[outcome] += 1
        print(f"{cls:<24}{counts['passed']:>8}{counts['failed']:>8}{counts['skipped']:>9}")
    control = results.get(CONTROL, {})
    regressions = 0
    for cls in OURS:
        ours = results.get(cls, {})
        worse = sorted(t for t, o in ours.items() if o == "failed" and control.get(t) == "passed")
        regressions += len(worse)
        print(f"\n{cls}: fails {len(worse)} test(s) the control passes" + "".join(f"\n  {t}" for t in worse))
        skipped_here = sorted(t for t, o in ours.items() if o == "skipped" and control.get(t) == "passed")
        if skipped_here:
            print(f"{cls}: skips {len(skipped_here)} the control passes" + "".join(f"\n  {t}" for t in skipped_here))
    for outcome in ("failed", "skipped"):
        both = sorted(t for t, o in control.items() if o == outcome and all(results[c].get(t) == outcome for c in OURS))
        print(f"\n{outcome} in every class (control included): {len(both)}" + "".join(f"\n  {t}" for t in both))
    return 1 if regressions else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests-from", type=Path, help="a transformers checkout (of the installed version's tag)")
    parser.add_argument("--model-from", type=Path, help="a folder whose modeling_gpt2_repro.py is tested instead")
    parser.add_argument("--no-run", action="store_true", help="build the suite and stop (to run pytest by hand)")
    args, pytest_args = parser.parse_known_args()

    import transformers

    version = transformers.__version__
    suite, stand_ins = build_suite(version, args.tests_from)
    if args.no_run:
        print(suite)
        return 0
    report = suite / "junit.xml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    model_dir = args.model_from.resolve() if args.model_from else REPO  # where modeling_gpt2_repro is imported from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(model_dir), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-c", str(suite / "pytest.ini"), "--rootdir", str(suite)]
    cmd += [f"--junitxml={report}", "tests/test_gpt2_repro_common.py", *pytest_args]
    print(" ".join(cmd), f"  (modeling_gpt2_repro.py from {model_dir})")
    proc = subprocess.run(cmd, cwd=suite, env=env)
    if not report.exists():
        print(f"pytest wrote no report (exit status {proc.returncode})")
        return 2
    return summarize(read_junit(report), stand_ins, version, suite)


if __name__ == "__main__":
    sys.exit(main())
