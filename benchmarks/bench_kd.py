"""Side-by-side timing of the PyTorch KD tutorial's loop and this project's path.

    python benchmarks/bench_kd.py                     # real CIFAR-10 copy if present
    python benchmarks/bench_kd.py --synthetic         # 50,000 synthetic CIFAR-shaped images
    python benchmarks/bench_kd.py --sweep-trials 3 --sweep-epochs 2 --json out.json

Both sides run in this one process, on the same images, the same device and the same
number of threads. The reference is written the way the tutorial writes it: a
torchvision-style dataset that turns each uint8 image into a PIL image and applies
ToTensor + Normalize per sample, a DataLoader (batch 128, shuffle, 2 workers), and for
KD a teacher forward pass at every step. The project side uses kd.data / kd.engine:
uint8 tensors batched by index permutations, normalised per batch on the device,
channels_last, and teacher logits read from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.batches import BatchStream, Preprocess  # noqa: E402
from kd.data import ImageFolderData, SyntheticData  # noqa: E402
from kd.devices import select_device  # noqa: E402
from kd.engine import accuracy, fit, predict_features, predict_logits  # noqa: E402
from kd.losses import DKD, CosineHidden, CrossEntropy, FeatureRegressor, HintonKD, StandardisedKD  # noqa: E402
from kd.models import DeepNN, LightNN  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


# ----------------------------------------------------------------------------- reference
class TutorialStyleCIFAR(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC array -> PIL -> transform."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor) -> None:
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def reference_train_epoch(model, loader, device) -> None:
    criterion, optimizer = torch.nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()


def reference_kd_epoch(teacher, student, loader, device, temperature=2.0, alpha=0.25) -> None:
    ce_loss, optimizer = torch.nn.CrossEntropyLoss(), torch.optim.Adam(student.parameters(), lr=1e-3)
    teacher.eval()
    student.train()
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        student_logits = student(inputs)
        soft_targets = F.softmax(teacher_logits / temperature, dim=-1)
        soft_prob = F.log_softmax(student_logits / temperature, dim=-1)
        soft_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * temperature**2
        loss = alpha * soft_loss + (1 - alpha) * ce_loss(student_logits, labels)
        loss.backward()
        optimizer.step()


def reference_accuracy(model, loader, device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in loader:
            predicted = model(inputs.to(device)).argmax(1)
            correct += (predicted == labels.to(device)).sum().item()
            total += labels.size(0)
    return 100.0 * correct / total


# ----------------------------------------------------------------------------- project
class ProjectPath:
    def __init__(self, data, device) -> None:
        self.data, self.device = data, device
        self.images = data.train.images.to(device)
        self.labels = data.train.labels.to(device)
        self.test_images, self.test_labels = data.test.images.to(device), data.test.labels.to(device)
        self.preprocess = Preprocess(MEAN, STD, device, channels_last=True)
        self.train_idx = torch.arange(len(self.labels))

    def model(self, cls, seed=0):
        torch.manual_seed(seed)
        return cls().to(self.device, memory_format=torch.channels_last)

    def train(self, model, loss_fn, epochs, teacher=None, amp=False, compile=False, last_epoch_only=False) -> float:
        loss_fn = loss_fn.to(self.device)
        optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
        batches = BatchStream(self.images, self.labels, self.train_idx, 128, seed=0)
        runner = torch.compile(model) if compile else model
        result = fit(
            runner, loss_fn, optimizer, batches, self.preprocess, epochs, teacher=teacher, amp=amp, progress=False
        )
        return result.history[-1]["seconds"] if last_epoch_only else result.train_seconds

    def trial(self, loss_fn, epochs, logits=None, seed=0, features=None) -> float:
        """A whole sweep trial: fresh student, train, evaluate on the test set; the
        teacher's logits (and features) come from the cache, as in a sweep."""
        start = time.perf_counter()
        student = self.model(LightNN, seed)
        features = features or {}
        teacher = (
            (lambda idx, x, slots: (logits[idx], {k: v[idx] for k, v in features.items()}))
            if logits is not None
            else None
        )
        self.train(student, loss_fn, epochs, teacher)
        accuracy(student, self.test_images, self.test_labels, self.preprocess)
        sync(self.device)
        return time.perf_counter() - start


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it ignores the pre-exec fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_data(args):
    if not args.synthetic and Path(args.data_root).is_dir():
        cache = os.environ.get("KD_CACHE_DIR", ".kd_cache")
        return ImageFolderData(root=args.data_root, cache_dir=cache).load(), f"ImageFolder {args.data_root}"
    data = SyntheticData(train_size=args.train_size or 50_000, test_size=10_000).load()
    return data, "synthetic CIFAR-shaped"


def rss_child(args) -> None:
    """One KD trial with cached logits, alone in a process, for its peak RSS."""
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    data, _ = load_data(args)
    project = ProjectPath(data, device)
    logits = torch.load(args.rss_child, map_location=device)
    project.trial(HintonKD(2.0, 0.25), args.sweep_epochs, logits)
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0
    print(json.dumps({"gpu_peak_mib": peak_gpu, "peak_rss_gib": peak_rss_gib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--synthetic", action="store_true", help="use synthetic data even if the real copy exists")
    parser.add_argument("--train-size", type=int, default=None, help="synthetic training images (default 50,000)")
    parser.add_argument("--sweep-trials", type=int, default=2)
    parser.add_argument("--sweep-epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers (tutorial: 2)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args)

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    data, data_desc = load_data(args)
    n_train = len(data.train)
    print(f"device {device}, {args.threads} threads, {data_desc}: {n_train} train / {len(data.test)} test", flush=True)
    project = ProjectPath(data, device)
    ref_loader = DataLoader(
        TutorialStyleCIFAR(data.train.images, data.train.labels),
        batch_size=128,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    ref_test = DataLoader(
        TutorialStyleCIFAR(data.test.images, data.test.labels), batch_size=128, shuffle=False, num_workers=args.workers
    )
    rows = []

    def report(phase, reference, project_seconds, note=""):
        rows.append(
            {
                "phase": phase,
                "reference_s": reference,
                "project_s": project_seconds,
                "ratio": reference / project_seconds if reference else None,
                "note": note,
            }
        )
        ratio = f"{reference / project_seconds:6.2f}x" if reference else "      -"
        print(f"{phase:<34} {reference or float('nan'):9.2f} {project_seconds:9.2f} {ratio}  {note}", flush=True)

    print(f"{'phase':<34} {'ref s':>9} {'kd s':>9} {'ref/kd':>7}", flush=True)
    # Teacher epoch (CE). The project teacher is then used for both sides' KD phases.
    torch.manual_seed(0)
    ref_teacher = DeepNN().to(device)
    ref = timed(lambda: (reference_train_epoch(ref_teacher, ref_loader, device), sync(device)))
    teacher = project.model(DeepNN)
    report("teacher epoch (CE)", ref, project.train(teacher, CrossEntropy(), 1))
    teacher.eval()
    ref_teacher.load_state_dict(teacher.state_dict())

    torch.manual_seed(0)
    ref_student = LightNN().to(device)
    ref = timed(lambda: (reference_train_epoch(ref_student, ref_loader, device), sync(device)))
    report("student CE epoch", ref, project.train(project.model(LightNN), CrossEntropy(), 1))

    logits_s = timed(lambda: (predict_logits(teacher, project.images, project.preprocess), sync(device)))
    logits = predict_logits(teacher, project.images, project.preprocess)
    report("teacher logits, once per teacher", None, logits_s, "cached on disk; every KD trial reuses it")

    torch.manual_seed(0)
    ref_student = LightNN().to(device)
    ref = timed(lambda: (reference_kd_epoch(ref_teacher, ref_student, ref_loader, device), sync(device)))
    report(
        "student KD epoch",
        ref,
        project.train(project.model(LightNN), HintonKD(2.0, 0.25), 1, lambda idx, x, slots: (logits[idx], {})),
    )

    n, e = args.sweep_trials, args.sweep_epochs

    def reference_trial(seed):
        torch.manual_seed(seed)
        student = LightNN().to(device)
        for _ in range(e):
            reference_kd_epoch(ref_teacher, student, ref_loader, device)
        reference_accuracy(student, ref_test, device)
        sync(device)

    ref = timed(lambda: [reference_trial(s) for s in range(n)])
    # KD and CE trials alternate, and which of the two goes first alternates by seed, so
    # neither arm always runs on a warmer (or more loaded) machine.
    kd_trials, ce_trials = [], []
    for s in range(n):
        arms = [("kd", lambda s=s: project.trial(HintonKD(2.0, 0.25), e, logits, seed=s))]
        arms.append(("ce", lambda s=s: project.trial(CrossEntropy(), e, seed=s)))
        for arm, run in arms if s % 2 == 0 else arms[::-1]:
            (kd_trials if arm == "kd" else ce_trials).append(run())
    report(f"sweep: {n} KD trials x {e} epoch(s)", ref, sum(kd_trials), "teacher already trained")
    kd_over_ce = sum(kd_trials) / sum(ce_trials)
    print(
        f"KD trial / CE trial wall time (project): {kd_over_ce:.3f} "
        f"({sum(kd_trials) / n:.2f}s vs {sum(ce_trials) / n:.2f}s per trial)",
        flush=True,
    )
    # Every other method, its teacher signal from the cache (features in float16 on the
    # device, computed once like the logits): trial wall time over a CE trial's.
    features = {
        k: v.to(device) for k, v in predict_features(teacher, project.images, project.preprocess, ("conv",)).items()
    }
    method_over_ce = {}
    for name, make in [
        ("kd_std", StandardisedKD),
        ("dkd", DKD),
        ("cosine", CosineHidden),
        ("regressor", FeatureRegressor),
    ]:
        seconds = sum(project.trial(make(), e, logits, seed=s, features=features) for s in range(n))
        method_over_ce[name] = seconds / sum(ce_trials)
        print(f"{name} trial / CE trial wall time (project): {method_over_ce[name]:.3f}", flush=True)

    if device.type == "cuda":
        # The CUDA-only switches (trainer.amp, trainer.compile): epoch 2 of 2, so
        # compilation and autotuning are not counted.
        variants = {
            "fp32": {},
            "bf16 autocast": {"amp": True},
            "torch.compile": {"compile": True},
            "bf16 + compile": {"amp": True, "compile": True},
        }
        kd_signal = lambda idx, x, slots: (logits[idx], {})  # noqa: E731
        for name, flags in variants.items():
            t_s = project.train(project.model(DeepNN), CrossEntropy(), 2, last_epoch_only=True, **flags)
            s_s = project.train(
                project.model(LightNN), HintonKD(2.0, 0.25), 2, kd_signal, last_epoch_only=True, **flags
            )
            rows.append({"phase": f"variant {name}", "teacher_epoch_s": t_s, "student_kd_epoch_s": s_s})
            print(f"variant {name:<16} teacher epoch {t_s:7.2f}s   student KD epoch {s_s:7.2f}s", flush=True)

    # Peak RSS of one KD trial, measured alone in a fresh process.
    logits_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_logits_{os.getpid()}.pt"
    torch.save(logits.cpu(), logits_file)
    child_args = [
        sys.executable,
        __file__,
        "--rss-child",
        str(logits_file),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--sweep-epochs",
        str(e),
        "--data-root",
        args.data_root,
    ]
    if args.synthetic:
        child_args.append("--synthetic")
    if args.train_size:
        child_args += ["--train-size", str(args.train_size)]
    child = subprocess.run(child_args, stdout=subprocess.PIPE, text=True, check=True)
    logits_file.unlink()
    child_info = json.loads(child.stdout.strip().splitlines()[-1])
    kd_trial_rss = child_info["peak_rss_gib"]
    bench_rss = peak_rss_gib()
    print(
        f"peak RSS of one KD trial (fresh process): {kd_trial_rss:.2f} GiB"
        + (f"; GPU peak {child_info['gpu_peak_mib']:.0f} MiB" if child_info.get("gpu_peak_mib") else "")
    )
    print(f"peak RSS of this benchmark process (both sides): {bench_rss:.2f} GiB")

    if args.json:
        result = {
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch": torch.__version__,
            "threads": args.threads,
            "data": data_desc,
            "train_images": n_train,
            "rows": rows,
            "kd_trial_over_ce_trial": kd_over_ce,
            "method_trial_over_ce_trial": method_over_ce,
            "kd_trial_peak_rss_gib": kd_trial_rss,
            "benchmark_peak_rss_gib": bench_rss,
            "sweep_trials": n,
            "sweep_epochs": e,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
