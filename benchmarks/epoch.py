"""One training epoch of kd's trainer against a bare PyTorch loop, and against the machine's peak.

    python benchmarks/epoch.py                                   # teacher and student, float32 and bf16
    python benchmarks/epoch.py --models teacher --dtypes bf16 --images 8192 --repeats 5
    python benchmarks/epoch.py --json docs/results/epoch_cpu.json
    python benchmarks/epoch.py --smoke                           # tiny: checks the script
    python benchmarks/epoch.py --data-root ../shared/data/cifar10-jpeg --models teacher

In this one process, on the same synthetic images (kd's ``data=synthetic``; with
``--data-root``, the first ``--images`` training images of an ImageFolder tree such as
the CIFAR-10 copy, and 128 of its test images), model class, optimiser (Adam, lr
1e-3), batch size and dtype, each repeat times:

- **project**: :func:`kd.recipes.train_model` for one epoch, as a run calls it (uint8
  images gathered per batch and normalised on the device, channels_last, NaN checks,
  the resume checkpoint at the epoch's end), including building the model;
- **bare**: the loop a PyTorch user writes: the same images already normalised, a
  random permutation, ``model(x)``, cross-entropy, ``backward``, ``step``.

The two alternate which goes first. Printed per model and dtype: the median
project/bare ratio (and each repeat's), the training FLOPs per image
(FlopCounterMode over one forward + backward, divided by the batch), the GFLOP/s each
achieved and that as a fraction of the peak matmul rate measured here, in float32 and
bf16, on a 2048 x 2048 product with the same threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.cost import device_name, seconds_per_call  # noqa: E402
from kd.devices import bf16_is_native, select_device, use_cpu  # noqa: E402
from kd.plan import resolve  # noqa: E402
from kd.recipes import Context, make_context, resume_file, run_model_key, train_model  # noqa: E402

MODELS = {"teacher": "teacher", "student": "student"}  # name -> conf/model option
AMP = {"float32": "off", "bf16": "bf16"}


def peak_matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """GFLOP/s of an n x n x n matrix product in ``dtype``: the rate this machine's
    matmul kernels reach, which convolutions lowered to them can at best approach."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / seconds_per_call(lambda x: x @ b, a, min_run_time=1.0) / 1e9


def config(model: str, dtype: str, images: int, batch_size: int, device: str, store: Path, data_root=None):
    if data_root is None:
        data = ["data=synthetic", f"data.train_size={images}", "data.val_size=0", "data.test_size=128"]
    else:  # the whole tree is decoded (once, into the cache); subset() keeps `images` of it
        data = ["data=folder", f"data.root={data_root}", "data.val_size=0"]
    overrides = [
        f"model={MODELS[model]}",
        *data,  # 128 test images: the test accuracy train_model ends with, ~3 % of a 4,096-image epoch
        "trainer.epochs=1",
        f"trainer.batch_size={batch_size}",
        f"trainer.amp={AMP[dtype]}",
        f"trainer.device={device}",
        "trainer.progress=false",
        f"paths.store_dir={store}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return compose(config_name="config", overrides=overrides)


def subset(ctx: Context, images: int, test_images: int = 128) -> Context:
    """``ctx`` with its first ``images`` training and ``test_images`` test images only."""
    data = dataclasses.replace(ctx.data, train_idx=ctx.data.train_idx[:images], val_idx=ctx.data.val_idx[:0])
    return dataclasses.replace(
        ctx, data=data, test_images=ctx.test_images[:test_images], test_labels=ctx.test_labels[:test_images]
    )


def project_epoch(cfg, ctx, seed: int) -> float:
    recipe = resolve(cfg).recipe(seed)
    resume = resume_file(ctx, run_model_key(ctx, seed))
    started = time.perf_counter()
    train_model(recipe, resolve(cfg).new_loss(), ctx, resume=resume)
    seconds = time.perf_counter() - started
    resume.remove()  # the next repeat starts from scratch, not from this epoch's end
    return seconds


def bare_steps(model, optimizer, inputs: torch.Tensor, labels: torch.Tensor, batch: int, amp: bool) -> None:
    """One epoch of plain PyTorch steps: shuffled batches, bf16 autocast when ``amp``."""
    for index in torch.randperm(len(labels), device=inputs.device).split(batch):
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(inputs[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    float(loss.detach())  # one sync at the end, as the project's last-step check


def bare_epoch(cfg, ctx, seed: int, inputs: torch.Tensor, labels: torch.Tensor, amp: bool) -> float:
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = resolve(cfg).build(cfg.model).to(ctx.device, memory_format=ctx.memory_format).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    bare_steps(model, optimizer, inputs, labels, int(cfg.trainer.batch_size), amp)
    return time.perf_counter() - started


def train_flops_per_image(cfg, ctx, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model = resolve(cfg).build(cfg.model).to(ctx.device, memory_format=ctx.memory_format).train()
    batch = int(cfg.trainer.batch_size)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(inputs[:batch]), labels[:batch]).backward()
    return counter.get_total_flops() / batch


def measure(model: str, dtype: str, args, device: torch.device, store: Path, peaks: dict[str, float]) -> dict:
    cfg = config(model, dtype, args.images, args.batch_size, device.type, store, args.data_root)
    ctx = subset(make_context(resolve(cfg), device), args.images)
    amp = dtype == "bf16"
    inputs = ctx.preprocess(ctx.train_images[ctx.data.train_idx.to(device)])
    labels = ctx.train_labels[ctx.data.train_idx.to(device)]
    flops = train_flops_per_image(cfg, ctx, inputs, labels)
    images = len(labels)
    # Warm-up: one-time kernel selection and allocations, paid by neither arm's timing.
    project_epoch(cfg, subset(ctx, 2 * args.batch_size), 0)
    bare_epoch(cfg, ctx, 0, inputs[: 2 * args.batch_size], labels[: 2 * args.batch_size], amp)
    project, bare = [], []
    for repeat in range(args.repeats):
        arms = [("project", project), ("bare", bare)]
        for name, times in arms if repeat % 2 == 0 else arms[::-1]:
            seed = 100 + repeat
            if name == "project":
                times.append(project_epoch(cfg, ctx, seed))
            else:
                times.append(bare_epoch(cfg, ctx, seed, inputs, labels, amp))
    ratios = [p / b for p, b in zip(project, bare, strict=True)]
    row = {
        "model": model,
        "dtype": dtype,
        "images": images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "project_seconds": project,
        "bare_seconds": bare,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "train_flops_per_image": flops,
        "project_gflops": flops * images / statistics.median(project) / 1e9,
        "bare_gflops": flops * images / statistics.median(bare) / 1e9,
    }
    row["project_fraction_of_peak"] = row["project_gflops"] / peaks[dtype]
    row["bare_fraction_of_peak"] = row["bare_gflops"] / peaks[dtype]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(AMP), choices=list(AMP))
    parser.add_argument("--images", type=int, default=4096, help="training images per epoch")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="an ImageFolder tree (train/, test/) instead of synthetic images"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.batch_size, args.repeats = 256, 64, 2
    device = select_device(args.device)
    use_cpu(args.threads or torch.get_num_threads(), flush_denormal=True)
    peaks = {"float32": peak_matmul_gflops(torch.float32, device), "bf16": peak_matmul_gflops(torch.bfloat16, device)}
    print(
        f"{device_name(device)} ({device}), {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; bf16 native: {bf16_is_native(device)}; peak matmul GFLOP/s: "
        f"float32 {peaks['float32']:.0f}, bf16 {peaks['bf16']:.0f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as store:
        for model in args.models:
            for dtype in args.dtypes:
                row = measure(model, dtype, args, device, Path(store), peaks)
                rows.append(row)
                print(
                    f"{model:8s} {dtype:8s} project/bare {row['ratio_median']:.3f} "
                    f"({', '.join(f'{r:.3f}' for r in row['ratios'])}); "
                    f"project {statistics.median(row['project_seconds']):.2f} s, bare "
                    f"{statistics.median(row['bare_seconds']):.2f} s for {row['images']} images; "
                    f"{row['train_flops_per_image'] / 1e6:.1f} MFLOP/image trained: "
                    f"{row['project_gflops']:.0f} GFLOP/s = {100 * row['project_fraction_of_peak']:.1f} % of the "
                    f"{dtype} matmul peak (bare {100 * row['bare_fraction_of_peak']:.1f} %)",
                    flush=True,
                )
    if args.json is not None:
        machine = {"device": str(device), "name": device_name(device), "threads": torch.get_num_threads()}
        machine.update(torch=torch.__version__, bf16_native=bf16_is_native(device))
        machine["data"] = str(args.data_root) if args.data_root else "synthetic"
        args.json.write_text(json.dumps({"machine": machine, "peak_gflops": peaks, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
