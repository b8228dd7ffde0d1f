"""Packaging rules from the contract: import hygiene and the package_dir mapping."""

import ast
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ("easympt", "transform", "serve", "tests", "benchmarks", "scripts")


def _python_files():
    for d in SOURCE_DIRS:
        for base, _, files in os.walk(os.path.join(ROOT, d)):
            yield from (os.path.join(base, f) for f in files if f.endswith(".py"))


def test_import_easympt_pulls_no_torch_gradio_fastapi():
    code = ("import sys, easympt, easympt.transform; "
            "bad = [m for m in ('torch', 'gradio', 'fastapi') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr


def test_nothing_imports_bare_transform_or_serve():
    offenders = []
    for path in _python_files():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in ("transform", "serve")]
    assert not offenders, offenders


def test_wheel_maps_transform_and_serve_into_easympt(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), ROOT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "easympt/transform/hf_to_flax.py" in names
    assert "easympt/serve/__init__.py" in names
    assert not [n for n in names if n.startswith(("transform/", "serve/", "tests/"))]
