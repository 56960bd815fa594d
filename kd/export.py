"""Export a run's trained model, checked against PyTorch before it is kept.

    python -m kd.export RUN_DIR --format onnx          # RUN_DIR/model.onnx
    python -m kd.export RUN_DIR --format torchscript   # RUN_DIR/model.ts
    python -m kd.export RUN_DIR --format pt2           # RUN_DIR/model.pt2 (torch.export)
    python -m kd.export --study SWEEP_DIR --trial 7    # trial 7's student, from the study's artifacts

The model is rebuilt from the run's own config (``RUN_DIR/.hydra/config.yaml``) and
checkpoint (loaded with ``weights_only=True``), exported with a dynamic batch size, run
on random inputs beside the PyTorch model (onnxruntime for ONNX), and written next to
the run's metrics.json only when the two agree within ``--tolerance``. The exported
model's batch-1 latency is timed the same way as metrics.json's ``latency_ms``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from kd.config import allowed_targets, build
from kd.cost import seconds_per_call
from kd.errors import CheckpointError, ConfigError, KDError
from kd.storage import write_json
from kd.teacher import load_checkpoint, restore_model

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}
CHECK_BATCH = 8  # random images the exported model is checked on


class ExportError(KDError):
    """The exported model disagrees with PyTorch, or the exporter failed."""


def _needs(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--format onnx needs {module}: pip install -e '.[export]'") from None


def run_model(run_dir: Path, seed: int | None = None) -> tuple[nn.Module, tuple[int, ...], Path]:
    """The model a run trained (seed ``seed``; default its first), in eval mode on the
    CPU, with its input shape and checkpoint path."""
    metrics_path = run_dir / "metrics.json"
    config_path = run_dir / ".hydra" / "config.yaml"
    if not metrics_path.is_file() or not config_path.is_file():
        trials = sorted((p.parent.name for p in run_dir.glob("*/metrics.json")), key=lambda n: (len(n), n))
        hint = (
            f"; it is a sweep's folder: export one of its runs, {run_dir}/<{'|'.join(trials[:8])}"
            f"{'|...' if len(trials) > 8 else ''}> (python -m kd.report {run_dir} names the best)"
            if trials
            else ""
        )
        raise CheckpointError(f"{run_dir} is not a finished kd run (no metrics.json or .hydra/config.yaml){hint}")
    metrics = json.loads(metrics_path.read_text())
    records = metrics.get("per_seed") or []
    if metrics.get("status") != "completed" or not records:
        raise CheckpointError(f"{run_dir} did not complete (status {metrics.get('status')!r}); nothing to export")
    chosen = records[0] if seed is None else next((r for r in records if r.get("seed") == seed), None)
    if chosen is None:
        seeds = ", ".join(str(r.get("seed")) for r in records)
        raise ConfigError(f"--seed {seed} is not a seed of {run_dir} (its seeds: {seeds})")
    shape = metrics.get("input_shape")
    if not shape:
        raise CheckpointError(f"{metrics_path} records no input_shape (a run from before kd.export); rerun it")
    cfg = OmegaConf.load(config_path)
    checkpoint = load_checkpoint(chosen["checkpoint"], key="checkpoint")
    model = build(cfg.model, allowed_targets(cfg), num_classes=checkpoint.get("num_classes"))
    restore_model(checkpoint, model, str(cfg.model._target_), checkpoint.get("num_classes"), key="model")
    return model.eval(), tuple(shape), Path(chosen["checkpoint"])


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    _needs("onnx")
    _needs("onnxscript")
    ort = _needs("onnxruntime")
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,  # one self-contained file (students are far below ONNX's 2 GB limit)
        verbose=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the thread count its record states
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    # PyTorch deprecates TorchScript with a FutureWarning from each of the four calls: said
    # once, here, with its successor.
    print("kd: TorchScript is deprecated by PyTorch; --format pt2 (torch.export) is its successor", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
        torch.jit.save(torch.jit.trace(model, example), str(path))
        return torch.jit.load(str(path)).eval()


def _pt2(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(path))
    return torch.export.load(str(path)).module()


EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "pt2": _pt2}


def export(
    run_dir: str | Path, fmt: str, seed: int | None = None, tolerance: float = 1e-4, min_run_time: float = 0.2
) -> dict[str, Any]:
    """Export, check and time a run's model; returns what is also written to
    ``<model>.<format>.json`` beside it."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir)
    model, shape, checkpoint = run_model(run_dir, seed)
    destination = checkpoint.with_suffix(FORMATS[fmt])
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *shape, generator=generator)
    check = torch.randn(CHECK_BATCH, *shape, generator=generator)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        staged = Path(tmp) / destination.name
        try:
            with torch.no_grad():
                exported = EXPORTERS[fmt](model, example, staged)
                difference = float((exported(check) - model(check)).abs().max())
                latency = seconds_per_call(exported, check[:1], min_run_time)
        except KDError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"exporting {checkpoint} as {fmt} failed: {first}") from None
        if not difference <= tolerance:
            raise ExportError(
                f"the {fmt} export of {checkpoint} differs from PyTorch by up to {difference:.3g} on "
                f"{CHECK_BATCH} random images (tolerance {tolerance:g}); not written"
            )
        staged.replace(destination)
    record = {
        "format": fmt,
        "path": str(destination),
        "bytes": destination.stat().st_size,
        "checked_images": CHECK_BATCH,
        "max_abs_difference": difference,
        "tolerance": tolerance,
        "latency_ms": latency * 1e3,
        "latency_batch_size": 1,
        "threads": torch.get_num_threads(),
        "runtime": "onnxruntime (CPU)" if fmt == "onnx" else f"torch {torch.__version__} (CPU)",
    }
    write_json(destination.with_name(destination.name + ".json"), record)
    return record


def fetch_trial(study_spec: str, number: int, dest: Path) -> Path:
    """Rebuild trial ``number``'s run folder in ``dest`` from its study's artifact store
    (``hydra.sweeper.artifacts``): its checkpoints, metrics.json and config. The trial's
    own run folder may be gone."""
    from hydra_plugins.kd_sweeper import artifacts
    from hydra_plugins.kd_sweeper.study import find_study

    try:
        files = artifacts.fetch(find_study(study_spec), number, dest)
    except ValueError as err:
        raise CheckpointError(f"--study {err}") from None
    config = dest / "config.yaml"
    if not config.is_file() or not (dest / "metrics.json").is_file():
        raise CheckpointError(f"trial {number} kept {[f.name for f in files]}: no metrics.json and config.yaml")
    (dest / ".hydra").mkdir(exist_ok=True)
    config.replace(dest / ".hydra" / "config.yaml")
    metrics = json.loads((dest / "metrics.json").read_text())
    for record in metrics.get("per_seed") or []:  # the checkpoints, where they are now
        record["checkpoint"] = str(dest / Path(record["checkpoint"]).name)
    write_json(dest / "metrics.json", metrics)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a finished run's directory (holds metrics.json)")
    parser.add_argument("--study", help="a sweep folder or storage URL[#study]: fetch --trial's files from it")
    parser.add_argument("--trial", type=int, help="with --study: the trial whose student to export")
    parser.add_argument("--format", default="onnx", choices=sorted(FORMATS), help="default: onnx")
    parser.add_argument("--seed", type=int, default=None, help="which seed's model (default: the run's first)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference in logits allowed")
    args = parser.parse_args(argv)
    with_study = args.study is not None and args.trial is not None
    if not with_study and (args.run_dir is None or args.study is not None or args.trial is not None):
        parser.error("give a RUN_DIR, or --study and --trial (then RUN_DIR, if given, is where its files go)")
    try:
        if args.study is not None:
            where = args.run_dir or Path(f"trial-{args.trial}")
            args.run_dir = fetch_trial(args.study, args.trial, where)
            print(f"fetched trial {args.trial} of {args.study} into {where}")
        record = export(args.run_dir, args.format, seed=args.seed, tolerance=args.tolerance)
    except KDError as err:
        print(f"kd: error: {err}", file=sys.stderr)
        return err.exit_code
    print(
        f"wrote {record['path']} ({record['bytes'] / 1e6:.2f} MB): matches PyTorch on {record['checked_images']} "
        f"random images (max abs difference {record['max_abs_difference']:.2g}); "
        f"{record['runtime']} latency {record['latency_ms']:.3g} ms at batch 1 with {record['threads']} threads"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
