"""``dashboards/``: the Grafana dashboard queries exactly the gauges telemetry exports (under
Ray's ``ray_`` prefix, with the labels telemetry sets), its panels are well-formed, and
``prometheus.yml`` scrapes Ray's service-discovery file. No Ray cluster: telemetry's gauges are
recorded through a stand-in for ``ray.util.metrics.Gauge``."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from matsci_ray.config import ExperimentConfig
from matsci_ray.tasks.registry import TASKS, metric_key
from matsci_ray.train.metrics import MetricSums
from matsci_ray.train.telemetry import EXPORTED_METRICS, Telemetry

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
DASHBOARD = DASHBOARDS / "grafana" / "matsci_ray_training.json"
PREFIX = "ray_"  # what Ray's metrics agent puts before every exported name (test below)
OURS = {PREFIX + name for name in EXPORTED_METRICS}
DATASOURCE = "${datasource}"
# PromQL words that look like metric names but are not
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and template-variable queries."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(query)
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers outside strings, label matchers, range
    brackets and grouping clauses that are not called like functions."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(GROUPING, "", expr)
    expr = re.sub(r"label_values\s*\(([^,()]*),[^)]*\)", r"(\1)", expr)  # Grafana's helper
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def labels_used(expr: str) -> dict[str, set[str]]:
    """Per metric, the labels an expression matches on, groups by or reads with
    label_values."""
    used: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", expr):
        used.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", matchers))
    grouped = {label.strip() for group in re.findall(GROUPING, expr) for label in group.split(",")}
    read = set(re.findall(r"label_values\s*\([^,]*,\s*(\w+)\s*\)", expr))
    for name in metric_names(expr):
        used.setdefault(name, set()).update(grouped | read)
    return used


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


class _Gauge:
    """Records what telemetry does with ``ray.util.metrics.Gauge``."""

    made: ClassVar[dict[str, _Gauge]] = {}

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
        assert name not in self.made, f"gauge {name} created twice"
        self.name, self.tag_keys = name, tuple(tag_keys)
        self.values: list[tuple[float, dict[str, str]]] = []
        self.made[name] = self

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert set(tags or {}) == set(self.tag_keys), (self.name, tags)
        self.values.append((value, dict(tags or {})))


def _logged_keys() -> list[str]:
    """Keys one epoch logs (loop.py): train losses as MetricSums names them, every task's
    validation metric as the reports read it, and the other per-epoch numbers."""
    sums = MetricSums(None, distributed=False)  # type: ignore[arg-type]
    for task in TASKS:
        sums.add_loss(task, 1.0, 1)
    keys = list(sums.compute("train/")) + [metric_key(t) for t in TASKS]
    keys += [f"val/{t}/energy_mse" for t, s in TASKS.items() if s.kind == "forces"]
    keys += [f"train/{t}/{TASKS[t].metric}" for t in TASKS]  # training metrics: no panel
    return [*keys, "time/train_s", "time/val_s", "time/report_s", "lr", "best_score"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, _Gauge]:
    """The gauges a rank-0 Telemetry creates, after logging one epoch of every task."""
    import ray.util.metrics

    tmp = tmp_path_factory.mktemp("telemetry")
    config = ExperimentConfig.model_validate(
        {
            "name": "dash-test",
            "tasks": ["mp-band-gap"],
            "data": {"root": str(tmp)},
            "run": {"storage": str(tmp)},
        }
    )
    _Gauge.made = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray.util.metrics, "Gauge", _Gauge)
        telemetry = Telemetry(config, rank=0)
        metrics = dict.fromkeys(_logged_keys(), 0.5)
        metrics.update({"epoch": 1, "train/samples_per_s": 80.0, "train/data_wait_fraction": 0.7})
        telemetry.log(metrics, 1)
        telemetry.close()
    return dict(_Gauge.made)


def test_ray_prefixes_exported_metric_names() -> None:
    """Ray's metrics agent exports a ``ray.util.metrics`` gauge ``x`` as ``ray_x``: its
    OpenTelemetry recorder (``RAY_enable_open_telemetry``, on by default) registers
    ``f"{NAMESPACE}_{name}"`` (the OpenCensus path uses namespace "ray" too)."""
    recorder = pytest.importorskip("ray._private.telemetry.open_telemetry_metric_recorder")
    assert f"{recorder.NAMESPACE}_" == PREFIX


def test_telemetry_creates_exactly_the_exported_gauges(exported: dict[str, _Gauge]) -> None:
    assert set(exported) == set(EXPORTED_METRICS)
    for gauge in exported.values():
        assert "experiment" in gauge.tag_keys and gauge.values, gauge.name
        assert all(tags["experiment"] == "dash-test" for _, tags in gauge.values)


def test_dashboard_queries_every_exported_gauge_and_nothing_else(
    dashboard: dict[str, Any],
) -> None:
    names = set().union(*map(metric_names, _exprs(dashboard)))
    ours = {n for n in names if "matsci" in n}
    assert ours <= OURS, f"not exported by telemetry.py (renamed?): {sorted(ours - OURS)}"
    assert ours >= OURS, f"exported but on no panel: {sorted(OURS - ours)}"
    # anything else must be a metric Ray's own dashboards query
    import ray.dashboard.modules.metrics.dashboards as ray_dashboards

    ray_panels = "".join(
        p.read_text() for p in Path(ray_dashboards.__file__).parent.glob("*_panels.py")
    )
    for name in names - ours:
        assert re.search(rf"\b{name}\b", ray_panels), f"{name}: not a metric Ray's dashboards use"


def test_dashboard_labels_are_the_ones_telemetry_sets(
    dashboard: dict[str, Any], exported: dict[str, _Gauge]
) -> None:
    for expr in _exprs(dashboard):
        for name, labels in labels_used(expr).items():
            if name in OURS:
                tag_keys = set(exported[name.removeprefix(PREFIX)].tag_keys)
                assert labels <= tag_keys, (expr, labels - tag_keys)


def _panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [p for p in _panels(dashboard) if p["title"] == title]
    return panel


def _name_regex(panel: dict[str, Any], task: str) -> re.Pattern[str]:
    """The panel's ``name=~`` matcher with ``$task`` as Grafana substitutes it."""
    (expr,) = [t["expr"] for t in panel["targets"]]
    (pattern,) = re.findall(r'name=~"([^"]*)"', expr)
    return re.compile(pattern.replace("$task", task))  # PromQL regexes are anchored: fullmatch


@pytest.mark.parametrize("task", [".+", "mp-band-gap"])  # "All", then one task picked
def test_metric_panels_select_the_logged_keys(
    dashboard: dict[str, Any], exported: dict[str, _Gauge], task: str
) -> None:
    names = {tags["name"] for _, tags in exported["matsci_ray_metric"].values}
    assert set(_logged_keys()) <= names  # every logged number reaches the gauge
    picked = [t for t in TASKS if re.fullmatch(task, t)]
    expected = {
        "Training loss per task": {f"train/{t}/loss" for t in picked},
        "Validation error per task": {
            k
            for t in picked
            for k in (metric_key(t), f"val/{t}/energy_mse")
            if TASKS[t].metric != "accuracy" and k in names
        },
        "Validation accuracy per task": {
            metric_key(t) for t in picked if TASKS[t].metric == "accuracy"
        },
        "Epoch wall time": {"time/train_s", "time/val_s", "time/report_s"},
    }
    for title, keys in expected.items():
        regex = _name_regex(_panel(dashboard, title), task)
        assert {n for n in names if regex.fullmatch(n)} == keys, title


def test_task_variable_lists_the_tasks(dashboard: dict[str, Any]) -> None:
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "task"]
    pattern = var["regex"].strip("/").replace(r"\/", "/")  # Grafana's /regex/ form
    found = {m.group(1) for k in _logged_keys() if (m := re.search(pattern, k))}
    assert found == set(TASKS)


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel.get("title"), panel["id"]
        x, y, w, h = (panel["gridPos"][k] for k in "xywh")
        assert x >= 0 and x + w <= 24, panel["title"]  # Grafana's grid is 24 wide
        for cell in itertools.product(range(x, x + w), range(y, y + h)):
            assert cell not in occupied, f"{panel['title']} overlaps {occupied[cell]}"
            occupied[cell] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == DATASOURCE and target["expr"], panel["title"]
        if panel["type"] != "text":
            assert panel["targets"], panel["title"]


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    experiment = variables["experiment"]
    assert experiment["datasource"]["uid"] == DATASOURCE
    assert re.fullmatch(r"label_values\(ray_matsci_ray_\w+, experiment\)", experiment["definition"])
    # every $variable a query uses is defined (Grafana's own $__… aside)
    used = {v for e in _exprs(dashboard) for v in re.findall(r"\$\{?(\w+)", e)}
    assert {v for v in used if not v.startswith("__")} <= set(variables)


def test_prometheus_scrapes_rays_service_discovery_file() -> None:
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    text = (DASHBOARDS / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert files == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    # the commented-out static example parses too once uncommented, on the cluster's port
    _, example = text.split("# --- static example ---\n")
    block = [line[4:] for line in example.splitlines() if re.match(r"  # (- |  )", line)]
    (static,) = yaml.safe_load("\n".join(block))
    assert static["job_name"] == "ray-static"
    targets = [t for c in static["static_configs"] for t in c["targets"]]
    assert targets and all(t.endswith(":8080") for t in targets)
