"""The project adds one import name, `ddpo`, to a user's environment: the folders models/ and data/ are
`ddpo.models` and `ddpo.data`, so a user's own `data` or `models` package keeps working beside it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_ddpo_only(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves no build/ folder in the checkout
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("ddpo", "models", "data"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("ddpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"ddpo"}, sorted(top)
    for module in (
        "ddpo/models/base.py",
        "ddpo/models/muffin.py",
        "ddpo/data/records.py",
        "ddpo/data/synthetic/world.py",
        "ddpo/eval/assets/coco_synonyms.txt",
    ):
        assert module in names, f"{module} missing from the wheel"


@pytest.mark.slow
def test_a_users_own_data_and_models_packages_are_not_shadowed(tmp_path):
    for name in ("data", "models"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    script = (
        "import data, models\n"
        "from ddpo.data.records import PairBatch\n"
        "from ddpo.models.config import ModelConfig\n"
        "import ddpo.data, ddpo.models\n"
        "assert (data.OWNER, models.OWNER) == ('user data', 'user models'), (data.OWNER, models.OWNER)\n"
        "assert ddpo.data.__name__ == 'ddpo.data' and ddpo.models.__name__ == 'ddpo.models'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
