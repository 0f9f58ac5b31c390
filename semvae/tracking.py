"""Run tracking: Weights & Biases (offline unless told otherwise) plus local files that need no W&B to read.

Every run writes, in its run dir:
- ``config.json``: the resolved config as plain values;
- ``metrics.jsonl``: one JSON object per ``log`` call (``step`` plus the logged scalars);
- ``summary.json``: the final metrics, rewritten atomically whenever the summary changes;
- images as PNG beside them.
W&B gets the same scalars and images, the config, and the final checkpoint as an artifact. A W&B start-up
failure never stops training: online mode falls back to offline, and offline to local files only, with a warning;
a W&B call that fails later (a full or read-only disk under W&B's folders, say) ends W&B for this run, with a
warning, and the run goes on with its local files.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from semvae.checkpoints import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """One run's logging. ``mode``: "offline" (default), "online" or "disabled" (local files only)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any],
        mode: str = "offline",
        project: str = "semvae",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
        log_artifacts: bool = True,
        init_timeout: float = 60.0,
        run_id: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.summary: dict[str, Any] = {}
        write_json_atomic(config, self.run_dir / "config.json")
        self.log_artifacts = log_artifacts
        self.run = None
        self.mode = "disabled"
        if mode != "disabled":
            self._start_wandb(mode, config, project, name, group, job_type, entity, tags or [], init_timeout, run_id)

    def _start_wandb(self, mode, config, project, name, group, job_type, entity, tags, init_timeout, run_id) -> None:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        if mode == "online" and not _has_api_key():
            log.warning(
                "W&B online mode asked for but no API key is configured; logging offline instead "
                "(upload later with `wandb sync %s/wandb/offline-run-*`)",
                self.run_dir,
            )
            mode = "offline"
        kwargs = dict(
            dir=str(self.run_dir),
            project=project,
            name=name,
            group=group,
            job_type=job_type,
            entity=entity,
            tags=tags,
            config=config,
            reinit="create_new",  # runs stacked in one process (hydra/launcher=stacked) log side by side
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True, init_timeout=init_timeout),
        )
        for attempt in [mode, "offline"] if mode == "online" else [mode]:
            try:
                self.run = wandb.init(mode=attempt, **kwargs)
                self.mode = attempt
                # which W&B run holds this run dir, for `python -m analysis.wandb_report` and `wandb sync`
                record = {"id": self.run.id, "project": project, "entity": entity, "group": group, "name": name}
                write_json_atomic(record | {"job_type": job_type, "mode": attempt}, self.run_dir / "wandb.json")
                return
            except Exception as error:  # noqa: BLE001 - any W&B failure must leave training running
                log.warning("W&B failed to start in %s mode (%s: %s)", attempt, type(error).__name__, error)
        log.warning("W&B is unavailable; this run logs to %s and %s only", self.metrics_path, self.summary_path)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (kept in checkpoints, so that a resumed run logs into the same W&B run)."""
        return self.run.id if self.run is not None else None

    def _wandb(self, what: str, call, *args, **kwargs) -> None:
        """Make one W&B call; if it fails, say so, stop using W&B in this run and go on with the local files."""
        if self.run is None:
            return
        try:
            call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - logging must never fail a run
            log.warning(
                "W&B failed while %s (%s: %s); this run goes on without W&B, its results are in %s",
                what,
                type(error).__name__,
                error,
                self.run_dir,
            )
            run, self.run = self.run, None
            try:
                run.finish(exit_code=1, quiet=True)
            except Exception:  # noqa: BLE001 - already reported
                pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: _jsonable(float(v)) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._wandb("logging metrics", lambda: self.run.log(dict(metrics), step=step))

    def forget_after(self, step: int) -> None:
        """Drop the local records of steps after ``step`` (a resumed run logs them again)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for number, line in enumerate(self.metrics_path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill or a full disk
                log.warning("%s: line %d is damaged and is dropped", self.metrics_path, number)
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic("".join(line + "\n" for line in kept), self.metrics_path)

    def log_images(self, images: dict[str, Tensor], step: int, nrow: int = 8) -> None:
        """Save each image batch (B, 1, H, W) in [0, 1] as a PNG grid and log the same pixels to W&B (as 8-bit
        values: ``wandb.Image`` reads a float array as 0-255, which would make [0, 1] images black)."""
        from PIL import Image

        pixels = {
            key: image_grid(batch.detach().float().cpu(), nrow).mul(255).add_(0.5).clamp_(0, 255).byte().numpy()
            for key, batch in images.items()
        }
        for key, grid in pixels.items():
            Image.fromarray(grid).save(self.run_dir / f"{key.replace('/', '_')}.png")
        if self.run is not None:
            import wandb

            logged = lambda: self.run.log({k: wandb.Image(g) for k, g in pixels.items()}, step=step)  # noqa: E731
            self._wandb("logging images", logged)

    def log_table(self, key: str, frame) -> None:
        """A pandas DataFrame as a W&B table (the run dir already holds it as CSV)."""
        if self.run is not None:
            import wandb

            self._wandb("logging a table", lambda: self.run.log({key: wandb.Table(dataframe=frame)}))

    def log_files(self, images: dict[str, str | Path]) -> None:
        """Figures already saved as PNG, logged to W&B as images."""
        if self.run is not None:
            import wandb

            self._wandb("logging figures", lambda: self.run.log({k: wandb.Image(str(p)) for k, p in images.items()}))

    def update_summary(self, values: dict[str, Any]) -> None:
        self.summary.update({k: _jsonable(v) for k, v in values.items()})
        write_json_atomic(self.summary, self.summary_path)
        self._wandb("updating the summary", lambda: self.run.summary.update(values))

    def log_checkpoint(self, path: str | Path, name: str, metadata: dict[str, Any]) -> None:
        if self.run is None or not self.log_artifacts:
            return
        import wandb

        def upload() -> None:
            artifact = wandb.Artifact(name=_artifact_name(name), type="model", metadata=metadata)
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

        self._wandb("logging the model as an artifact", upload)

    def finish(self, exit_code: int = 0) -> None:
        self._wandb("finishing", lambda: self.run.finish(exit_code=exit_code))
        self.run = None

    def stopped(self) -> None:
        """End the W&B run of a cleanly stopped run: tagged ``stopped`` (its summary's status says so too), exit code
        0, so that W&B does not show a run that saved everything and can continue as failed."""

        def tag() -> None:
            self.run.tags = tuple(t for t in self.run.tags or () if t != "stopped") + ("stopped",)

        self._wandb("tagging the run as stopped", tag)
        self.finish(exit_code=0)


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "model"


def image_grid(batch: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """A (B, 1, H, W) batch tiled row by row, ``nrow`` images a row, into one (rows, cols) image with ``padding``
    pixels of ``pad_value`` around every image: the layout of torchvision's ``make_grid`` (a test holds them equal;
    a single image is padded too, where ``make_grid`` returns it bare), without importing torchvision, which takes
    about as long to import as torch. An empty batch or ``nrow`` < 1 is a ValueError."""
    b, _, h, w = batch.shape
    if b == 0 or nrow < 1:
        raise ValueError(f"image_grid needs at least one image and nrow >= 1, got {b} images and nrow={nrow}")
    cols = min(nrow, b)
    rows = -(-b // cols)
    tiles = torch.full((rows * cols, h + padding, w + padding), pad_value, dtype=batch.dtype)
    tiles[:b, padding:, padding:] = batch[:, 0]
    grid = tiles.view(rows, cols, h + padding, w + padding).permute(0, 2, 1, 3).reshape(rows * (h + padding), -1)
    return torch.nn.functional.pad(grid, (0, padding, 0, padding), value=pad_value)
