"""The tables of the README and docs/ that come from committed data, written from that data.

    python -m analysis.docs            # rewrite every generated block from its data
    python -m analysis.docs --check    # exit 1, naming the blocks, where a page and its data disagree

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` in a Markdown page;
``BLOCKS[NAME]`` writes its text from files under ``analysis/results/`` (the Results, the λ study, the evaluation
size) and ``benchmarks/recorded/`` (the benchmark tables). Text outside the markers is the page's own.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "analysis" / "results"
RECORDED = ROOT / "benchmarks" / "recorded"
PAGES = ("README.md", "docs/*.md")
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)

VARIANTS = {"vae": "VAE (β = 1)", "beta": "β-VAE (β = 5)", "semantic": "semantic VAE (β = 1, λ = 10)"}
# (metric, label, scale, unit suffix) of the Results table, in its order
RESULT_ROWS = (
    ("test/mse", "MSE", 1, ""),
    ("test/neg_elbo", "−ELBO (nats)", 1, ""),
    ("test/gsv_norm_train", "GSV norm, train judge", 1, ""),
    ("test/gsv_norm_heldout", "GSV norm, held-out judge", 1, ""),
    ("test/gsv_norm_morpho", "GSV norm, morpho judge", 1, ""),
    ("test/gsv_raw_train", "GSV raw, train judge", 1, ""),
    ("test/gsv_raw_heldout", "GSV raw, held-out judge", 1, ""),
    ("test/gsv_raw_morpho", "GSV raw, morpho judge", 1, ""),
    ("test/latent_norm_mean", "mean ‖μ(x)‖ (prior E‖z‖ = 3.94)", 1, ""),
    ("test/latent_norm_std", "sd ‖μ(x)‖", 1, ""),
    ("test/active_units", "active units (of 16)", 1, ""),
    ("test/recon_accuracy", "train classifier's accuracy on reconstructions (%)", 100, ""),
    ("test/mig", "MIG (against the morphometrics)", 1, ""),
)
HEADLINE_ROWS = ("test/mse", "test/gsv_norm_train", "test/gsv_norm_heldout", "test/gsv_norm_morpho")
DIFFERENCE_ROWS = (
    "test/mse",
    "test/gsv_norm_train",
    "test/gsv_norm_heldout",
    "test/gsv_norm_morpho",
    "test/gsv_raw_morpho",
)
LAMBDA_ROWS = (
    ("test/mse", "MSE", 1),
    ("test/neg_elbo", "−ELBO (nats)", 1),
    ("test/gsv_norm_train", "GSV norm, train judge", 1),
    ("test/gsv_norm_heldout", "GSV norm, held-out judge", 1),
    ("test/gsv_norm_morpho", "GSV norm, morpho judge", 1),
    ("test/gsv_change_train", "reading change Δ², train judge", 1),
    ("test/gsv_change_heldout", "reading change Δ², held-out judge", 1),
    ("test/gsv_change_morpho", "reading change Δ², morpho judge", 1),
    ("test/recon_accuracy", "train classifier's accuracy on reconstructions (%)", 100),
    ("test/recon_top_class_share", "share of reconstructions read as φ's most read class", 1),
    ("test/latent_norm_mean", "mean ‖μ(x)‖", 1),
)


def significant(value: float, digits: int = 2) -> int:
    """Decimal places that show ``value`` to ``digits`` significant digits (0 for a value >= 10^digits)."""
    if value == 0 or not math.isfinite(value):
        return 0
    return max(0, digits - 1 - math.floor(math.log10(abs(value))))


def mean_pm(mean: float, half_width: float, n: int, scale: float = 1) -> str:
    """``mean ± half-width``, the half-width to two significant digits and the mean to the same place; a mean
    alone (three significant digits) where the interval does not exist (n < 2)."""
    mean, half_width = mean * scale, half_width * scale
    if n < 2 or not math.isfinite(half_width):
        return f"{mean:.{significant(mean, 3)}f}"
    if half_width == 0:
        return f"{mean:.3g} ± 0"
    places = significant(half_width)
    return f"{mean:.{places}f} ± {half_width:.{places}f}"


def comparison(path: Path) -> pd.DataFrame:
    """A report's ``comparison.csv`` (or ``differences_from_*.csv``): one row per group, columns (metric, stat)."""
    frame = pd.read_csv(path, header=[0, 1], index_col=0)
    frame = frame.loc[[i for i in frame.index if isinstance(i, str) and i != "variant"]]
    return frame.apply(pd.to_numeric)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def _cell(frame: pd.DataFrame, group: str, metric: str, scale: float = 1) -> str:
    stats = frame.loc[group, metric]
    return mean_pm(stats["mean"], stats["half_width"], int(stats["n"]), scale)


def _seeds(frame: pd.DataFrame, group: str, metrics) -> int:
    return int(frame.loc[group, metrics[0]]["n"])


def results_table(rows=RESULT_ROWS) -> str:
    frame = comparison(RESULTS / "comparison.csv")
    header = ["metric (test split)"] + [f"{VARIANTS[v]}, n = {_seeds(frame, v, ['test/mse'])}" for v in VARIANTS]
    body = [[label] + [_cell(frame, v, metric, scale) for v in VARIANTS] for metric, label, scale, _ in rows]
    return _table(header, body)


def headline() -> str:
    return results_table(tuple(r for r in RESULT_ROWS if r[0] in HEADLINE_ROWS))


def differences() -> str:
    """The semantic VAE minus the VAE and minus the β-VAE: difference of means ± Welch half-width, bold where the
    interval leaves out 0."""
    sides = {base: comparison(RESULTS / f"differences_from_{base}.csv") for base in ("vae", "beta")}
    labels = {metric: label for metric, label, _, _ in RESULT_ROWS}
    seeds = comparison(RESULTS / "comparison.csv")
    n = {v: _seeds(seeds, v, ["test/mse"]) for v in VARIANTS}
    header = ["metric"] + [
        f"semantic − {name} (n = {n['semantic']} and {n[base]})" for base, name in (("vae", "VAE"), ("beta", "β-VAE"))
    ]
    body = []
    for metric in DIFFERENCE_ROWS:
        row = [labels[metric]]
        for frame in sides.values():
            stats = frame.loc["semantic", metric]
            text = mean_pm(stats["mean"], stats["half_width"], int(stats["n"]))
            text = ("+" if stats["mean"] >= 0 else "−") + text.lstrip("-")
            row.append(f"**{text}**" if abs(stats["mean"]) > stats["half_width"] else text)
        body.append(row)
    return _table(header, body)


def lambda_table() -> str:
    """The λ study at β = 1: every λ (and the raw arm) with its number of seeds in the column's title."""
    frame = pd.read_csv(RESULTS / "lambda" / "comparison.csv", header=[0, 1], index_col=[0, 1, 2])
    frame = frame.loc[[i for i in frame.index if i[0] != "variant"]].apply(pd.to_numeric)
    columns = []
    for key in frame.index:
        weight, normalised = float(key[1]), str(key[2]) == "True"
        n = int(frame.loc[key, "test/mse"]["n"])
        name = "λ = 0 (VAE)" if weight == 0 else f"λ = {weight:g}" + ("" if normalised else ", raw term")
        columns.append((weight if normalised else weight + 0.5, key, f"{name}, n = {n}"))
    columns.sort()
    header = ["β = 1"] + [title for _, _, title in columns]
    body = []
    for metric, label, scale in LAMBDA_ROWS:
        row = [label]
        for _, key, _ in columns:
            stats = frame.loc[key, metric]
            row.append(mean_pm(stats["mean"], stats["half_width"], int(stats["n"]), scale))
        body.append(row)
    return _table(header, body)


def evaluation_size() -> str:
    data = json.loads((RESULTS / "evaluation_size" / "evaluation_size.json").read_text())
    header = [
        "variant / judge",
        "GSV norm (mean over seeds)",
        f"SE at N = {data['points']}",
        "SD between seeds",
        "SE of the difference to the VAE of the same seed",
        "N the rule asks",
    ]
    body = []
    for key, s in data["summary"].items():
        variant, judge = key.split("/")
        paired = "–" if s["paired_se_vs_VAE"] is None else f"{s['paired_se_vs_VAE']:.4f}"
        asks = "beyond the 10,000 test images" if s["rule_n"] is None else f"{s['rule_n']:,}"
        judge = "held-out" if judge == "heldout" else judge
        row = [f"{variant} / {judge} ({s['seeds']} seeds)", f"{s['mean']:.4f}", f"{s['se']:.4f}"]
        body.append(row + [f"{s['between_seed_sd']:.4f}", paired, asks])
    source = (
        f"`python -m benchmarks.evaluation_size --points {data['points']}` on {data['device_name']}, "
        f"{data['torch_threads']} thread(s), {data['resamples']} bootstrap resamples.\n\n"
    )
    return source + _table(header, body)


def recorded(name: str) -> Callable[[], str]:
    """A benchmark table kept in ``benchmarks/recorded/NAME.json``: the command and machine it came from, its
    columns and rows."""

    def block() -> str:
        data = json.loads((RECORDED / f"{name}.json").read_text())
        intro = f"`{data['command']}` on {data['machine']}:\n\n"
        return intro + _table(data["columns"], [[str(v) for v in row] for row in data["rows"]])

    return block


BLOCKS: dict[str, Callable[[], str]] = {
    "headline": headline,
    "results": results_table,
    "differences": differences,
    "lambda": lambda_table,
    "evaluation-size": evaluation_size,
    "throughput-cpu": recorded("throughput_cpu"),
    "throughput-cuda": recorded("throughput_cuda"),
    "sweep-cpu": recorded("sweep_cpu"),
    "precision-cpu": recorded("precision_cpu"),
}


def pages(root: Path = ROOT) -> list[Path]:
    return sorted(p for pattern in PAGES for p in root.glob(pattern))


def render(text: str) -> str:
    """The page with every generated block written afresh from its data; an unknown block name is an error."""

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return match.group(1) + BLOCKS[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def stale(root: Path = ROOT) -> list[str]:
    """``PAGE: BLOCK`` for every generated block whose text is not what its data gives."""
    found = []
    for page in pages(root):
        text = page.read_text()
        fresh = dict((m.group("name"), m.group("body")) for m in BLOCK.finditer(render(text)))
        for match in BLOCK.finditer(text):
            if fresh[match.group("name")] != match.group("body"):
                found.append(f"{page.relative_to(root)}: {match.group('name')}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming every stale block")
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        for entry in found:
            print(f"stale: {entry} (run python -m analysis.docs)", file=sys.stderr)
        return 1 if found else 0
    for page in pages():
        text = page.read_text()
        new = render(text)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
