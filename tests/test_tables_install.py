"""Tables install: the committed tables ship inside the wheel and are found after a non-editable install;
``tune`` says where it wrote and whether the library reads it there; ``table`` finds this machine's
tables for any world size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fused_a2a.cluster import detect_cluster
from fused_a2a import tuning
from cli_runs import run_cli
from runfiles import tuning_json, write_run

REPO = Path(__file__).resolve().parents[1]
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("FUSED_A2A_TUNING_DIR", "FUSED_A2A_CLUSTER_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    tuning.clear()
    yield monkeypatch
    tuning.clear()


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "a2a_bench").rglob("__init__.py")} | {
        ".".join(p.parent.relative_to(REPO / "library").parts) for p in (REPO / "library").rglob("__init__.py")}
    assert on_disk | {"fused_a2a.tuning_results"} == set(config["packages"])
    assert config["package-dir"]["fused_a2a.tuning_results"] == "tuning_results"


def test_a_non_editable_install_finds_the_committed_tables(tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    tuning_json(source / "tuning_results" / "cpu-gloo-x2")  # a committed table of this test's cluster
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("a2a_bench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fused_a2a/tuning_results/cpu-gloo-x2/tuning.json" in names
    assert "fused_a2a/tuning_results/README.md" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip does with a wheel
    shutil.rmtree(source)  # nothing may come from the source tree any more
    probe = ("import fused_a2a, json; from fused_a2a.tuning.resolve import load_cluster_table, packaged_dir; "
             "table, path = load_cluster_table('cpu-gloo-x2', strict=True); "
             "print(json.dumps([fused_a2a.__file__, str(packaged_dir()), str(path)]))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, packaged, table = json.loads(proc.stdout)
    assert module == str(site / "fused_a2a" / "__init__.py")
    assert packaged == str(site / "fused_a2a" / "tuning_results")
    assert table == str(site / "fused_a2a" / "tuning_results" / "cpu-gloo-x2" / "tuning.json")


def test_tune_writes_to_the_tuning_dir_and_says_whether_the_library_reads_it(tmp_path: Path, clean_env, capsys) -> None:
    write_run(tmp_path / "run")
    clean_env.chdir(tmp_path)
    code, out, err = run_cli(clean_env, capsys, "tune", str(tmp_path / "run"))  # default: ./tuning_results
    assert code == 0, err
    written = Path("tuning_results") / "cpu-gloo-x2" / "tuning.json"
    assert (tmp_path / written).is_file()
    assert f"wrote {written}; fused_a2a does not read {tmp_path / 'tuning_results'}: run the jobs that should use " \
           f"it with FUSED_A2A_TUNING_DIR={tmp_path / 'tuning_results'}" in " ".join(out.split())

    clean_env.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path / "ours"))
    code, out, err = run_cli(clean_env, capsys, "tune", str(tmp_path / "run"))  # default: $FUSED_A2A_TUNING_DIR
    assert code == 0, err
    assert (tmp_path / "ours" / "cpu-gloo-x2" / "tuning.json").is_file()
    assert f"wrote {tmp_path / 'ours' / 'cpu-gloo-x2' / 'tuning.json'}; fused_a2a reads it there" in " ".join(out.split())


def test_table_without_an_argument_prints_this_machines_tables_of_every_world_size(tmp_path: Path, clean_env,
                                                                                   capsys) -> None:
    assert detect_cluster().gpu is None, "this test runs on a machine without a GPU"
    for cluster in ("cpu-gloo-x2", "cpu-gloo-x4", "h200-x8-nv18"):
        tuning_json(tmp_path / cluster)
        data = json.loads((tmp_path / cluster / "tuning.json").read_text())
        data["cluster"]["id"] = cluster
        (tmp_path / cluster / "tuning.json").write_text(json.dumps(data))
    clean_env.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path))
    code, out, err = run_cli(clean_env, capsys, "table")
    assert code == 0, err
    assert "tuning table of cpu-gloo-x2" in out and "tuning table of cpu-gloo-x4" in out and "h200" not in out
    assert (tmp_path / "cpu-gloo-x2" / "TABLE.md").is_file() and (tmp_path / "cpu-gloo-x4" / "TABLE.md").is_file()
    assert not (tmp_path / "h200-x8-nv18" / "TABLE.md").exists()

    clean_env.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path / "none"))
    code, out, err = run_cli(clean_env, capsys, "table")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("a2a-bench: error: no tuning table for this machine yet: looked for cpu-gloo-x<ranks> (any "
                          f"number of ranks) in {tmp_path / 'none'} or ")
    assert "make one with a2a-bench sweep --nproc 2 --tune, or pass a CLUSTER_DIR" in err
    assert not any(regex in err for regex in ("\\d", "\\-", "$", "(?", "+)"))  # words, not a pattern
