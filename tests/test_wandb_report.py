"""The W&B Report of a folder of runs (analysis/wandb_report.py): its blocks, panels, run set and filter, built
offline; and the save path with W&B's API stubbed at its boundary (``wandb.Api``), since no server is reachable."""

import json
import re
import shutil

import pytest

from analysis.wandb_report import NothingToReport, build, main, outline
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "runs"
# wandb-workspaces still declares pydantic-1 style validators
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")


@pytest.fixture
def logged_runs(tmp_path):
    """Four fixture runs (vae and beta, two seeds each) as if logged to W&B offline, plus one that was not."""
    for run in ("0", "1", "6", "7", "8"):
        shutil.copytree(FIXTURES / run, tmp_path / run)
    for run in ("0", "1", "6", "7"):
        record = {"id": f"id{run}", "project": "semvae-test", "entity": None, "group": "g", "name": "n"}
        (tmp_path / run / "wandb.json").write_text(json.dumps(record | {"job_type": "vae", "mode": "offline"}))
    return tmp_path


def test_the_report_compares_the_folder_s_runs_and_only_them(logged_runs):
    report = build(logged_runs, entity="me")
    assert (report.entity, report.project, report.title) == ("me", "semvae-test", f"semvae: {logged_runs.name}")
    grid = next(b for b in report.blocks if type(b).__name__ == "PanelGrid")
    (runset,) = grid.runsets
    assert (runset.entity, runset.project) == ("me", "semvae-test")
    assert runset.filters == "Metric(\"ID\") in ['id0', 'id1', 'id6', 'id7']"  # run 8 was never on W&B
    kinds = [type(p).__name__ for p in grid.panels]
    assert kinds == ["ParallelCoordinatesPlot", "ScatterPlot", "ScatterPlot", "ScatterPlot"]  # no grids to show
    columns = [c.metric.name for c in grid.panels[0].columns]
    assert columns == [
        "loss.beta",
        "loss.semantic_weight",
        "test/mse",
        "test/gsv_norm_train",
        "test/gsv_norm_heldout",
        "test/gsv_norm_morpho",
    ]
    assert [type(c.metric).__name__ for c in grid.panels[0].columns[:3]] == ["Config", "Config", "SummaryMetric"]
    assert [(p.x.name, p.y.name) for p in grid.panels[1:4]] == [
        ("test/mse", f"test/gsv_norm_{judge}") for judge in ("train", "heldout", "morpho")
    ]
    table = next(b.text for b in report.blocks if type(b).__name__ == "MarkdownBlock" and b.text.startswith("|"))
    assert table.splitlines()[0].startswith("| variant | loss.beta | n | test/mse |")
    assert [line.split(" | ")[:3] for line in table.splitlines()[2:]] == [["| vae", "1.0", "2"], ["| beta", "5.0", "2"]]
    assert "runset 'tmp" not in outline(report) and "ScatterPlot: x=test/mse, y=test/gsv_norm_morpho" in outline(report)


def test_a_folder_never_logged_to_wandb_is_refused(tmp_path):
    shutil.copytree(FIXTURES / "0", tmp_path / "0")
    with pytest.raises(NothingToReport, match="no wandb.json"):
        build(tmp_path)


class FakeApi:
    """W&B's public API as the report code uses it, recording the GraphQL calls instead of sending them."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        self._service_api = self  # the SDK's GraphQL transport, which wandb-workspaces calls
        self.app_url = "https://wandb.example"
        self.default_entity = "me"

    def projects(self, entity):
        return []

    def create_project(self, name, entity):
        FakeApi.calls.append(("create_project", {"name": name, "entity": entity}))

    def execute_graphql(self, query, variables):
        operation = query.split("(")[0].split()[-1]  # "mutation UpsertView(...)" -> "UpsertView"
        FakeApi.calls.append((operation, variables))
        if "upsert" in operation.lower():
            v = variables
            view = {"id": "report1", "displayName": v["displayName"], "description": v["description"]}
            return {"upsertView": {"view": view | {"spec": v["spec"], "project": {"name": v["projectName"]}}}}
        return {"project": {"internalId": "project1"}}


def view_types(node) -> list[str]:
    """The panel types of a report spec, in order."""
    if isinstance(node, dict):
        own = [node["viewType"]] if "viewType" in node else []
        return own + [t for value in node.values() for t in view_types(value)]
    return [t for value in node for t in view_types(value)] if isinstance(node, list) else []


def test_save_sends_the_report_spec_to_wandb(logged_runs, monkeypatch, capsys):
    import wandb

    FakeApi.calls = []
    monkeypatch.setattr(wandb, "Api", FakeApi)
    main([str(logged_runs), "--save", "--title", "my sweep"])
    assert ("create_project", {"name": "semvae-test", "entity": "me"}) in FakeApi.calls
    (upsert,) = [v for op, v in FakeApi.calls if "upsert" in op.lower()]
    assert (upsert["entityName"], upsert["projectName"], upsert["displayName"]) == ("me", "semvae-test", "my sweep")
    spec = json.loads(upsert["spec"])
    assert view_types(spec) == ["Parallel Coordinates Plot", "Scatter Plot", "Scatter Plot", "Scatter Plot"]
    text = json.dumps(spec)
    assert '"id0"' in text and '"id8"' not in text and "test/gsv_norm_heldout" in text
    assert "saved: https://wandb.example/me/semvae-test/reports/my-sweep--report1" in capsys.readouterr().out


def test_the_command_prints_the_outline_without_an_account(logged_runs, capsys):
    main([str(logged_runs)])  # python -m analysis.wandb_report FOLDER: no --save, so no W&B call
    out = capsys.readouterr().out
    assert "ParallelCoordinatesPlot: loss.beta -> loss.semantic_weight -> test/mse" in out
    assert "not saved: pass --save" in out


def test_a_run_dir_names_its_wandb_run_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    from semvae.tracking import Tracker

    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    first = Tracker(tmp_path, {"seed": 0}, mode="offline", project="semvae-test", name="VAE", group="g", job_type="vae")
    run_id = first.run_id
    first.finish()
    resumed = Tracker(tmp_path, {"seed": 0}, mode="offline", project="semvae-test", name="VAE", run_id=run_id)
    resumed.finish()
    record = json.loads((tmp_path / "wandb.json").read_text())
    assert record["id"] == run_id and record["project"] == "semvae-test" and record["mode"] == "offline"
    segments = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # one W&B run, two segments (W&B adds -1 to the second folder's name when both start in the same second)
    assert len(segments) == 2 and all(
        re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", p.name) for p in segments
    )
    assert (tmp_path / "wandb" / "latest-run").resolve() == segments[-1].resolve()


def test_save_without_a_wandb_account_is_one_line(logged_runs, monkeypatch, capsys):
    import wandb

    class NotLoggedIn(FakeApi):
        def projects(self, entity):
            raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "Api", NotLoggedIn)
    with pytest.raises(SystemExit) as info:
        main([str(logged_runs), "--save", "--entity", "me"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: W&B did not save the report (UsageError: No API key configured")


def test_jobs_evaluated_after_training_get_their_interpolation_grids_in_the_report(logged_runs):
    (logged_runs / "0" / "interpolations.png").write_bytes(b"png")  # what task.evaluate=true writes
    grid = next(b for b in build(logged_runs, entity="me").blocks if type(b).__name__ == "PanelGrid")
    assert [p.media_keys for p in grid.panels if type(p).__name__ == "MediaBrowser"] == [["test/interpolations"]]
