"""The README's quick start runs as written (offline, on the stand-in checkpoint)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.setenv("EASYMPT_CACHE", str(tmp_path / "cache"))
    code = "\n".join(blocks).replace("/tmp/mpt-export", str(tmp_path / "export"))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(2, " in out
    assert os.path.isfile(tmp_path / "export" / "config.json")


def test_task_heads_example_runs(tmp_path, capsys):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Task heads", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    code = code.replace("/tmp/cls-run", str(tmp_path / "run")).replace("/tmp/cls-export", str(tmp_path / "export"))
    exec(compile(code, "README.md", "exec"), {})
    accuracy = float(capsys.readouterr().out.split("accuracy", 1)[1].split()[0])
    assert accuracy >= 0.75
    import transformers

    model, info = transformers.MptForSequenceClassification.from_pretrained(str(tmp_path / "export"),
                                                                            output_loading_info=True)
    assert not info["missing_keys"] and model.config.id2label == {0: "prose", 1: "code"}
