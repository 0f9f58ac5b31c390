"""How many GSV starting points an evaluation needs: each model's standard error over starting points against the
spread of the GSV between training seeds.

    python -m benchmarks.evaluation_size [--points 300] [--resamples 200] [--device cpu] [--out benchmarks/results]

For every model (default: the shipped VAE, b5-VAE and semanticVAE of seeds 0, 1, 2) the GSV of docs/METHOD.md under
the classifier judges, on the first ``--points`` starting points of the evaluation's selection (``evaluation.seed``
0, so they are the first of the default evaluation's 1,000), every latent axis and 64 random directions, steps 0.5,
1, 2, with its bootstrap standard error over the starting points (``metrics.resampled_se``). Per variant and judge:
the mean SE, the standard deviation of the GSV between seeds, and the SE of the paired difference to the VAE of the
same seed (both read on the same points and resamples, so the points' shared noise cancels).

The rule for ``evaluation.n_points``, stated before the numbers: a GSV is a mean over points, so its SE at N points
is predicted as SE(points) * sqrt(points / N); the rule's N is the smallest N whose predicted SE is at most a quarter
of the between-seed standard deviation, for every variant and judge (``--quarter`` changes the fraction). Where that
N exceeds the test split, no N reaches it and the table says so. Writes ``evaluation_size.json`` and
``evaluation_size.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from benchmarks import device_name
from semvae import checkpoints
from semvae.checkpoints import write_json_atomic, write_text_atomic
from semvae.config import EvaluationConfig
from semvae.data import load_split
from semvae.evaluation import metrics as ev
from semvae.evaluation.report import markdown
from semvae.evaluation.suite import select
from semvae.runtime import resolve_device
from semvae.variants import run_name

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("VAE", "b5-VAE", "semanticVAE")
SHIPPED = [
    *(ROOT / "weights" / f"{name}_epoch50.pth" for name in NAMES),
    *(ROOT / "weights" / "seeds" / f"{name}_seed{s}_epoch50.pth" for s in (1, 2) for name in NAMES),
]


def model_gsv(path: Path, starts: torch.Tensor, judges: dict, cfg: EvaluationConfig, resamples: int) -> dict:
    """The GSV of one model under each judge, its bootstrap SE and its resampled values (for paired differences)."""
    vae, state = checkpoints.load_vae(path, starts.device)
    vae.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    z = ev.latent_means(vae, starts, cfg.batch_size)
    directions = ev.evaluation_directions(vae.latent_dim, cfg.n_random_directions, cfg.seed).to(z.device)
    decode = lambda codes: torch.sigmoid(vae.decode(codes))  # noqa: E731
    gsv = ev.global_semantic_variance(
        decode, judges, z, directions, list(cfg.steps), cfg.batch_size, resamples=resamples, seed=cfg.seed
    )
    loss = state["config"]["loss"]
    row = {
        "model": path.stem,
        "variant": run_name(loss["beta"], loss["semantic_weight"]),
        "seed": state["config"]["seed"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    for judge, values in gsv.items():
        row[f"gsv_norm_{judge}"] = values["norm"].nanmean().item()
        row[f"gsv_norm_{judge}_se"] = ev.resampled_se(values["norm"], values["resampled_norm"])
        row[f"resampled_{judge}"] = values["resampled_norm"].flatten(1).nanmean(1).tolist()  # (B,)
    return row


def rule(se: float, points: int, sd: float, fraction: float) -> int:
    """The smallest N with SE(points) * sqrt(points / N) <= fraction * sd."""
    return math.ceil(round(points * (se / (fraction * sd)) ** 2, 6)) if sd > 0 else math.inf  # round: no 200.0000001


def summarise(rows: list[dict], judges: list[str], points: int, fraction: float, test_size: int) -> dict:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    reference = variants[0]
    summary = {}
    for judge in judges:
        for variant in variants:
            mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
            values = torch.tensor([r[f"gsv_norm_{judge}"] for r in mine], dtype=torch.float64)
            se = sum(r[f"gsv_norm_{judge}_se"] for r in mine) / len(mine)
            sd = values.std(unbiased=True).item() if len(values) > 1 else float("nan")
            paired = []  # the SE of (this model - the reference of its seed), resample by resample
            for r in mine if variant != reference else []:
                ref = next((q for q in rows if q["variant"] == reference and q["seed"] == r["seed"]), None)
                if ref is not None:
                    diff = torch.tensor(r[f"resampled_{judge}"], dtype=torch.float64)
                    diff -= torch.tensor(ref[f"resampled_{judge}"], dtype=torch.float64)
                    paired.append(diff.std(unbiased=True).item())
            n = rule(se, points, sd, fraction) if not math.isnan(sd) else math.inf
            summary[f"{variant}/{judge}"] = {
                "seeds": len(mine),
                "mean": values.mean().item(),
                "se": se,
                "between_seed_sd": sd,
                "paired_se_vs_" + reference: sum(paired) / len(paired) if paired else None,
                "rule_n": n if n <= test_size else None,
            }
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, default=SHIPPED)
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--quarter", type=float, default=0.25, help="the fraction of the between-seed SD")
    parser.add_argument("--judges", nargs="+", default=["train", "heldout"], choices=["train", "heldout"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SEMVAE_DATA_DIR", ROOT / "data")))
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.models if not path.is_file()]
    if missing:  # before any work, and before anything in --out is replaced
        parser.error(f"--models: no such file: {', '.join(missing)}")

    device = resolve_device(args.device)
    cfg = EvaluationConfig()
    test = load_split("mnist", args.data, train=False, download=False).to(device)
    starts = select(test.images, args.points, cfg.n_pairs, cfg.seed).starts
    files = {"train": args.weights / "classifier.pth", "heldout": args.weights / "judge.pth"}
    judges = {}
    for judge in args.judges:
        net, _ = checkpoints.load_classifier(files[judge], device)
        judges[judge] = net.to(memory_format=torch.channels_last).features
    rows = []
    for path in args.models:
        rows.append(model_gsv(path, starts, judges, cfg, args.resamples))
        print(f"{path.name}: {rows[-1]['seconds']} s", flush=True)
    summary = summarise(rows, args.judges, args.points, args.quarter, len(test))
    results = {
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "points": args.points,
        "resamples": args.resamples,
        "fraction_of_between_seed_sd": args.quarter,
        "models_per_minute": round(60 * len(rows) / sum(r["seconds"] for r in rows), 2),
        "models": [{k: v for k, v in r.items() if not k.startswith("resampled_")} for r in rows],
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, args.out / "evaluation_size.json")
    write_text_atomic(table(results), args.out / "evaluation_size.md")
    return results


def table(results: dict) -> str:
    points, fraction = results["points"], results["fraction_of_between_seed_sd"]
    header = ["variant / judge", "seeds", "GSV norm", f"SE at N={points}", "SD between seeds", "paired SE vs VAE"]
    header.append(f"rule N (SE <= {fraction:g} SD)")
    rows = []
    for key, s in results["summary"].items():
        paired = next((v for k, v in s.items() if k.startswith("paired_se_vs_")), None)
        rows.append(
            [
                key,
                str(s["seeds"]),
                f"{s['mean']:.4f}",
                f"{s['se']:.4f}",
                f"{s['between_seed_sd']:.4f}",
                "-" if paired is None else f"{paired:.4f}",
                "beyond the test split" if s["rule_n"] is None else str(s["rule_n"]),
            ]
        )
    head = (
        f"GSV standard error over starting points ({results['resamples']} bootstrap resamples of {points} points) "
        f"against the spread between seeds, on {results['device_name']} ({results['torch_threads']} "
        f"threads): {results['models_per_minute']} models/min at this N.\n\n"
    )
    return head + markdown(header, rows)


if __name__ == "__main__":
    main()
