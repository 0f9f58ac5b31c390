"""A window on a GPU machine as one prepared command: the CUDA tests, the sweep benchmark, the study's missing jobs.

Before the window, here (where the data and the package registries are):

    python -m benchmarks.gpu_window prepare            # MNIST compressed and the wheels into .gpu_window/

In the window, on the GPU machine, from the repository's root, with ``.gpu_window`` carried beside the working tree
(the device tool's ``carry``; it is git-ignored, so it travels only when named):

    python -m benchmarks.gpu_window run --out $OUT --budget 540

``run`` does, each step within what is left of ``--budget`` seconds (the last ``--reserve`` kept for packing):

0. what the machine lacks: MNIST is unpacked from ``mnist.tar.gz`` (``../shared`` does not travel) unless
   ``SEMVAE_DATA_DIR`` already holds it; each package of ``PACKAGES`` that does not import is installed from the
   carried wheels (``pip install --no-index``). torch itself must be there: its wheels are far over what travels.
1. the CUDA tests: ``pytest -m cuda`` (tests/test_stacking.py's tests on the GPU);
2. ``benchmarks.sweep --device cuda --compile`` for 1, 6 and 30 members (one at a time, stacked, stacked +
   compile; processes are left out on one GPU, as the sweep benchmark explains);
3. the study's jobs still missing: the beta arm of ``experiment=sweep_beta_semantic`` (beta in {2, 5} x lambda in
   {0, 1, 10, 100, 1000} x seeds {0, 1, 2}, 30 jobs of 50 epochs with their evaluations) as one stacked multirun,
   the jobs named in ``--done`` (finished in earlier windows) skipped (``hydra.launcher.skip``). At the deadline it
   is sent SIGTERM: every job saves its last.pt and stops; only whole jobs come back, the rest run again later.
4. everything worth bringing back (logs, benchmark results, each finished job's folder without its last.pt and
   best.pt, the updated list of finished jobs) packed as ``window.tar.gz``, split into at most 8 parts of at most
   16 MiB (64 MiB in all) directly under ``--out``: nothing deeper than two folders. What did not fit is named in
   ``left_out.txt`` inside the pack.

After the window, here: ``cat window.tar.gz.* | tar xz`` gives ``logs/``, ``sweep/``, ``study/`` and ``done.txt``
(the jobs finished so far: commit it as the next window's ``--done``).

``--tiny`` runs every step at test size on the CPU (tests/test_gpu_window.py).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu_window"
DONE = ROOT / "benchmarks" / "gpu_window_done.txt"
# import name -> distribution: what a GPU machine with torch may lack, carried as wheels (pure Python, small)
PACKAGES = {
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime==4.9.3",
    "tqdm": "tqdm",
    "yaml": "PyYAML",
    "pytest": "pytest",
}
PART_BYTES, MAX_PARTS, TOTAL_BYTES = 16 * 2**20, 8, 64 * 2**20
STUDY = ["experiment=sweep_beta_semantic", "loss.beta=2,5", "trainer=gpu", "logger=none", "hydra/launcher=stacked"]
TINY_STUDY = [
    "experiment=sweep_beta_semantic",
    "loss.beta=2",
    "loss.semantic_weight=0,1",
    "seed=0,1",
    "trainer=smoke",
    "trainer.epochs=1",
    "model.widths=[4,4,4]",
    "loss.semantic.n_points=4",
    "loss.semantic.n_directions=1",
    "evaluation.n_points=8",
    "evaluation.morpho_points=2",
    "evaluation.n_random_directions=2",
    "evaluation.resamples=0",
    "evaluation.limit_test=64",
    "evaluation.judges=[train]",
    "logger=none",
    "hydra/launcher=stacked",
    "hydra.launcher.on_cpu=true",
]


def prepare(carry: Path, data: Path, wheels: bool) -> None:
    """MNIST (compressed) and the wheels of ``PACKAGES`` into ``carry``."""
    carry.mkdir(parents=True, exist_ok=True)
    with tarfile.open(carry / "mnist.tar.gz", "w:gz") as tar:
        tar.add(data / "MNIST" / "raw", arcname="MNIST/raw")
    if wheels:
        target = carry / "wheels"
        target.mkdir(exist_ok=True)
        pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(target)]
        subprocess.run([*pip, *PACKAGES.values()], check=True)
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    print(f"{carry}: {size / 2**20:.1f} MiB to carry (the working tree and what is carried travel within 64 MiB)")


def provide(carry: Path, log) -> dict[str, str]:
    """Step 0: the data and the missing packages; the environment the steps run with."""
    env = dict(os.environ)
    data = Path(env.get("SEMVAE_DATA_DIR", ROOT.parent / "shared" / "data"))
    if not (data / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        data = carry / "data"
        with tarfile.open(carry / "mnist.tar.gz") as tar:
            tar.extractall(data, filter="data")
        log(f"MNIST unpacked into {data}")
    env["SEMVAE_DATA_DIR"] = str(data)
    for module, dist in PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(carry / "wheels")]
            done = subprocess.run([*pip, dist], capture_output=True, text=True)
            log(f"{dist}: installed from the carried wheels" if done.returncode == 0 else f"{dist}: {done.stderr}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def step(name: str, command: list[str], seconds: float, env: dict, logs: Path, log) -> int | None:
    """Run ``command`` for at most ``seconds``; at the limit it gets SIGTERM (runs save and stop), then SIGKILL.
    Its output goes to ``logs/NAME.txt``; returns its exit status (None: not started, no time left)."""
    if seconds < 5:
        log(f"{name}: skipped, {seconds:.0f} s left")
        return None
    started = time.perf_counter()
    with open(logs / f"{name}.txt", "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            status = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                status = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                status = process.wait()
    log(f"{name}: exit status {status} after {time.perf_counter() - started:.0f} s: {' '.join(command)}")
    return status


def finished_jobs(study: Path) -> list[Path]:
    """The job folders of ``study`` whose summary says finished."""
    import json

    jobs = []
    for summary in sorted(study.glob("*/summary.json")):
        if json.loads(summary.read_text()).get("status") == "finished":
            jobs.append(summary.parent)
    return jobs


def pack(out: Path, work: Path) -> list[Path]:
    """``work`` (without training checkpoints) as ``window.tar.gz`` parts of at most ``PART_BYTES`` under ``out``;
    files are added smallest first while they total at most ``TOTAL_BYTES`` (so at most ``MAX_PARTS`` parts); the
    others are listed in ``left_out.txt``."""
    files = sorted((p for p in work.rglob("*") if p.is_file() and p.name not in ("last.pt", "best.pt")), key=_size)
    budget = TOTAL_BYTES - 2**20  # uncompressed; room for the tar headers and the list of what was left out
    taken, left, total = [], [], 0
    for path in files:
        size = path.stat().st_size
        if total + size <= budget:
            taken.append(path)
            total += size
        else:
            left.append(path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in taken:
            tar.add(path, arcname=str(path.relative_to(work)), recursive=False)
        listed = "".join(f"{p.relative_to(work)}\n" for p in left).encode()
        info = tarfile.TarInfo("left_out.txt")
        info.size = len(listed)
        tar.addfile(info, io.BytesIO(listed))
    data = buffer.getvalue()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        part = out / f"window.tar.gz.{i // PART_BYTES:02d}"
        part.write_bytes(data[i : i + PART_BYTES])
        parts.append(part)
    return parts


def _size(path: Path) -> int:
    return path.stat().st_size


def run(out: Path, budget: float, reserve: float, carry: Path, done_file: Path, tiny: bool) -> list[Path]:
    deadline = time.perf_counter() + budget - reserve
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_window_{os.getpid()}"
    logs = work / "logs"
    logs.mkdir(parents=True)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    def left() -> float:
        return deadline - time.perf_counter()

    env = provide(carry, log)
    python = sys.executable
    device = "cpu" if tiny else "cuda"
    tests = [python, "-m", "pytest", "-m", "cuda", "-n", "0", "-q", "-p", "no:cacheprovider", "tests/test_stacking.py"]
    step("cuda_tests", tests, min(left(), 120 if tiny else 180), env, logs, log)
    sweep = [python, "-m", "benchmarks.sweep", "--device", device, "--out", str(work / "sweep")]
    if tiny:
        sweep += ["--members", "1", "2", "--steps", "1", "--batch-size", "8", "--processes", "1"]
        sweep += ["--peak-seconds", "0.1"]
    else:
        sweep += ["--members", "1", "6", "30", "--compile"]
    step("sweep", sweep, min(left(), 120 if tiny else 240), env, logs, log)
    done = [n for n in done_file.read_text().split() if n] if done_file.is_file() else []
    study_dir = work / "study"
    skip = f"hydra.launcher.skip=[{','.join(done)}]"
    overrides = [*(TINY_STUDY if tiny else STUDY), skip, f"hydra.sweep.dir={study_dir}"]
    step("study", [python, "run.py", "-m", *overrides], left(), env, logs, log)
    finished = finished_jobs(study_dir) if study_dir.is_dir() else []
    names = sorted(set(done) | {_job_name(j) for j in finished})
    (work / "done.txt").write_text("".join(f"{n}\n" for n in names))
    log(f"study: {len(finished)} jobs finished in this window, {len(names)} in all")
    for job in study_dir.glob("*") if study_dir.is_dir() else []:
        if job.is_dir() and job not in finished:
            shutil.rmtree(job)  # unfinished: it runs again, whole, in a later window
    (logs / "window.txt").write_text("\n".join(lines) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    parts = pack(out, work)
    shutil.rmtree(work)
    return parts


def _job_name(job: Path) -> str:
    import json

    return json.loads((job / "config.json").read_text())["name"]


def main(argv: list[str] | None = None) -> list[Path] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="here: MNIST and the wheels into the folder to carry")
    p.add_argument("--carry", type=Path, default=CARRY)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("SEMVAE_DATA_DIR", ROOT.parent / "shared/data")))
    p.add_argument("--no-wheels", action="store_true", help="leave the wheels out (no registry needed)")
    r = commands.add_parser("run", help="there: the window's steps, packed into --out")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "window")))
    r.add_argument("--budget", type=float, default=540.0, help="seconds for the whole command")
    r.add_argument("--reserve", type=float, default=30.0, help="seconds kept for packing")
    r.add_argument("--carry", type=Path, default=CARRY)
    r.add_argument("--done", type=Path, default=DONE, help="the study's jobs finished in earlier windows")
    r.add_argument("--tiny", action="store_true", help="every step at test size, on the CPU")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.carry, args.data, wheels=not args.no_wheels)
        return None
    return run(args.out, args.budget, args.reserve, args.carry, args.done, args.tiny)


if __name__ == "__main__":
    main()
