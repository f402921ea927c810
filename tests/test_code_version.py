"""Cache keys cover the code: an edit of a helper a cached step uses forces a recompute, an
edit of an unrelated module does not (``vggflow/caching.py``, :func:`code_version`).

Real edits of real files: a small test package for the rule and for a real Prefect cached task,
then a temporary copy of vggflow's own source for the keys of its cached steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from vggflow.caching import code_closure, code_version
from vggflow.feature_cache import FEATURE_CODE

PACKAGE = {
    "__init__.py": "",
    "steps.py": """
        from typing import TYPE_CHECKING

        from vggflow.caching import cached_task

        if TYPE_CHECKING:
            from codepkg import annotations_only


        @cached_task("count", lambda p: p["name"], lambda p: True)
        def count(name: str) -> int:
            from codepkg.helper import bump  # a function-level import is a dependency too

            return bump(name)
    """,
    "helper.py": '''
        """Counts calls in a file beside the package."""
        from pathlib import Path

        from codepkg import deep


        def bump(name: str) -> int:
            counter = Path(__file__).parent.parent / f"{name}.count"
            done = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(done))
            return done + deep.OFFSET
    ''',
    "deep.py": "OFFSET = 0\n",
    "unrelated.py": "VALUE = 1\n",
    "annotations_only.py": "class Hint: ...\n",
}


@pytest.fixture
def codepkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package ``codepkg`` on sys.path: a cached task, the helpers it uses, and unrelated modules."""
    root = tmp_path / "codepkg"
    root.mkdir()
    for name, text in PACKAGE.items():
        (root / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m == "codepkg" or m.startswith("codepkg.")]:
        del sys.modules[name]


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_the_code_version_follows_every_import_of_the_package_and_nothing_else(codepkg: Path):
    assert set(code_closure("codepkg.steps")) == {"codepkg.steps", "codepkg.helper", "codepkg.deep"}
    before = code_version("codepkg.steps")
    append(codepkg / "unrelated.py", "VALUE = 2\n")
    append(codepkg / "annotations_only.py", "class Other: ...\n")  # imported for type checkers only
    append(codepkg / "helper.py", "# a comment says why\n")
    (codepkg / "helper.py").write_text((codepkg / "helper.py").read_text().replace("Counts calls", "Counts the calls"))
    assert code_version("codepkg.steps") == before
    append(codepkg / "deep.py", "OFFSET = 1\n")  # two imports away
    changed = code_version("codepkg.steps")
    assert changed != before
    append(codepkg / "helper.py", "LIMIT = 3\n")
    assert code_version("codepkg.steps") not in (before, changed)


def test_a_cached_task_runs_again_after_an_edit_of_a_helper_it_calls(codepkg: Path, prefect_server):
    from codepkg.steps import count
    from prefect import flow

    @flow
    def twice() -> int:
        return count("calls")

    counter = codepkg.parent / "calls.count"
    assert twice() == 1 and twice() == 1  # the second call is a cache hit
    append(codepkg / "unrelated.py", "VALUE = 3\n")
    assert twice() == 1 and counter.read_text() == "1"  # an unrelated edit reuses it
    append(codepkg / "helper.py", "\n\ndef extra() -> None:\n    pass\n")
    twice()
    assert counter.read_text() == "2"  # the helper changed: the task ran again
    twice()
    assert counter.read_text() == "2"


def test_vggflow_steps_depend_on_the_modules_they_use():
    head = code_closure("vggflow.tasks.train_head")
    assert {"vggflow.tasks.train_head", "vggflow.training", "vggflow.model", "vggflow.datasets"} <= set(head)
    assert not {"vggflow.registry", "vggflow.dashboard", "vggflow.tasks.promote", "vggflow.cli"} & set(head)
    features = code_closure(*FEATURE_CODE)
    assert {"vggflow.images", "vggflow.datasets"} <= set(features)  # imported inside write_features
    assert "vggflow.training" not in features


#: Prints the key of each cached thing of a real vggflow (the copy on PYTHONPATH), edits a module
#: given on the command line, prints them again.
KEYS_SCRIPT = """
import json, sys
from pathlib import Path
from types import SimpleNamespace

from vggflow.config import Config, StageConfig
from vggflow.feature_cache import FeatureSet, layer_cache_dir
from vggflow.caching import code_version
from vggflow.tasks.train_head import head_key
from vggflow.tasks.finetune import stage_key
from vggflow.tasks.validate import validation_cache_key
from vggflow.tracking import DvcState
from vggflow.scoring import registered_scores_file
import pandas as pd
import vggflow

rows = pd.DataFrame({"path": ["a/1.png"], "label": ["a"]})

assert str(Path(vggflow.__file__).parent).startswith(sys.argv[1]), vggflow.__file__  # the copy

def keys():
    cfg = Config()
    directory = layer_cache_dir(Path("cache"), "fingerprint", "weights", 32)
    features = FeatureSet(directory=directory, key="k", layers=["avg_pool"], rows_file=Path("rows.csv"),
                          class_names=["a", "b"], n_images=4)
    stage = StageConfig(unfreeze_from="block5", learning_rate=1e-4)
    return {
        "features": directory.name,
        "head": head_key(cfg, features),
        "stage": stage_key(cfg, SimpleNamespace(cache_key="head"), stage, features),
        "validation": validation_cache_key(cfg.data, cfg.validation, None, DvcState(None, None, None)),
        "test scores": code_version("vggflow.tasks.evaluate"),
        "champion scores": registered_scores_file(Path("s"), "v1", rows, ["a"], 8).name,
    }

before = keys()
for edited in sys.argv[2:]:
    path = Path(sys.argv[1]) / edited
    path.write_text(path.read_text() + "\\nEDITED_BY_THE_TEST = True\\n")
after = keys()
print(json.dumps(sorted(name for name in before if before[name] != after[name])))
"""


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the installed layout: vggflow/, with flows/ and tasks/ inside it as vggflow.flows, vggflow.tasks."""
    root = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(PROJECT_ROOT / "vggflow", root / "vggflow", ignore=ignore)
    shutil.copytree(PROJECT_ROOT / "tasks", root / "vggflow" / "tasks", ignore=ignore)
    shutil.copytree(PROJECT_ROOT / "flows", root / "vggflow" / "flows", ignore=ignore)
    return root


@pytest.mark.parametrize(
    ("edited", "changed"),
    [
        # the training loop: every checkpoint (and the evaluation step, which imports its result
        # type); not the features, the validation or the champion's scores
        (["vggflow/training.py"], ["head", "stage", "test scores"]),
        # image decoding: everything computed from images
        (["vggflow/images.py"], ["champion scores", "features", "head", "stage", "test scores", "validation"]),
        # the model graph: the base's outputs, the checkpoints, the test scores (the loaders resize with it)
        (["vggflow/model.py"], ["champion scores", "features", "head", "stage", "test scores"]),
        # the stage step alone
        (["vggflow/tasks/finetune.py"], ["stage"]),
        # unrelated: the dashboard, the registry's commands, another step, the command line
        (
            ["vggflow/dashboard.py", "vggflow/registry.py", "vggflow/tasks/model_card.py", "vggflow/cli/models.py"],
            [],
        ),
    ],
)
def test_vggflow_cache_keys_change_exactly_when_the_code_behind_them_does(source_copy, tmp_path, edited, changed):
    copy = tmp_path / "src"
    shutil.copytree(source_copy, copy)
    done = subprocess.run(
        [sys.executable, "-c", KEYS_SCRIPT, str(copy), *edited],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(copy)},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == changed
