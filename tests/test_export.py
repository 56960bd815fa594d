"""``python -m kd.export``: a run's model as ONNX, TorchScript or torch.export, checked
against PyTorch before it is written."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from kd import export
from kd.errors import CheckpointError, ConfigError
from tests.conftest import FAST, REPO, read_metrics, run_py

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One finished 1-epoch CE run (LightNN, width 0.5) to export."""
    workdir = tmp_path_factory.mktemp("export")
    proc = run_py([*FAST, "model.width=0.5", "hydra.run.dir=out/ce"], cwd=workdir, env={"KD_CACHE_DIR": str(workdir)})
    assert proc.returncode == 0, proc.stderr
    return workdir / "out/ce"


def _trained(run_dir):
    model, shape, _ = export.run_model(run_dir)
    return model, shape


def test_onnx_export_runs_in_onnxruntime_with_the_same_logits(run_dir):
    ort = pytest.importorskip("onnxruntime")
    proc = subprocess.run(
        [sys.executable, "-m", "kd.export", str(run_dir), "--format", "onnx"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "matches PyTorch on 8 random images" in proc.stdout and "onnxruntime" in proc.stdout
    path = run_dir / "model.onnx"
    record = json.loads((run_dir / "model.onnx.json").read_text())
    assert record["path"] == str(path) and record["max_abs_difference"] <= 1e-4 and record["latency_ms"] > 0
    # Independently of the export's own check: another batch size (the batch axis is dynamic).
    model, shape = _trained(run_dir)
    assert read_metrics(run_dir)["params"] == sum(p.numel() for p in model.parameters()) == 67_762
    images = torch.randn(5, *shape, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(logits), model(images), atol=1e-4)


@pytest.mark.parametrize(("fmt", "suffix"), [("torchscript", ".ts"), ("pt2", ".pt2")])
def test_torch_formats_load_back_and_agree(run_dir, fmt, suffix, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = export.export(run_dir, fmt, min_run_time=0.01)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # torch.jit's four: said once
    assert ("--format pt2 (torch.export) is its successor" in capsys.readouterr().err) == (fmt == "torchscript")
    path = run_dir / f"model{suffix}"
    assert record["path"] == str(path) and path.is_file()
    loaded = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    model, shape = _trained(run_dir)
    images = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images), atol=1e-5)


def test_an_export_that_disagrees_is_not_written(run_dir, monkeypatch):
    def off_by_one(model, example, path):
        path.write_bytes(b"not a model")
        return lambda x: model(x) + 1e-3

    monkeypatch.setitem(export.EXPORTERS, "torchscript", off_by_one)
    (run_dir / "model.ts").unlink(missing_ok=True)
    mismatch = r"differs from PyTorch by up to 0\.001 .*tolerance 0\.0001.*not written"
    with pytest.raises(export.ExportError, match=mismatch):
        export.export(run_dir, "torchscript", min_run_time=0.01)
    assert not (run_dir / "model.ts").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("tmp")] == []


def test_missing_extra_and_bad_input_are_one_line(run_dir, tmp_path, monkeypatch):
    real_import = export.importlib.import_module

    def no_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(export.importlib, "import_module", no_onnxruntime)
    with pytest.raises(ConfigError, match=r"needs onnxruntime: pip install -e '\.\[export\]'"):
        export.export(run_dir, "onnx")
    with pytest.raises(ConfigError, match="--seed 7 is not a seed of .*its seeds: 42"):
        export.export(run_dir, "pt2", seed=7)
    with pytest.raises(CheckpointError, match="is not a finished kd run") as refused:
        export.export(tmp_path, "pt2")
    assert "sweep" not in str(refused.value)
    sweep = tmp_path / "sweep"
    for trial in ("10", "2", "0"):
        (sweep / trial).mkdir(parents=True)
        (sweep / trial / "metrics.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"it is a sweep's folder: export one of its runs, {sweep}/<0\|2\|10> "
                       rf"\(python -m kd.report {sweep} names the best\)"):  # fmt: skip
        export.export(sweep, "pt2")
    assert export.main([str(tmp_path), "--format", "pt2"]) == CheckpointError.exit_code
