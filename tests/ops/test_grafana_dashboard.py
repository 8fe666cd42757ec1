"""``deploy/grafana-dashboard.json`` asks only for what a node exports: every panel's PromQL and the instance
variable name metrics a real node's ``/metrics`` holds (the node with model sync, the event log and shipping on, so
every family the daemon can export is there), with the right suffix for their type, ``rate`` only over counters and
histogram series, and label names those series carry."""
from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.bundle import signing
from edge_runtime.client import Client, RpcError
from edgerec.process import free_port, start_daemon, stop_daemon

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
# label names a target gets from Prometheus, not from the node
TARGET_LABELS = {"instance", "job"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum"),
             "gauge": ("",), "untyped": ("",), "info": ("_info",), "stateset": ("",), "gaugehistogram": ("_bucket",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label names
    (in ``{...}``, ``by (...)`` and the like), range durations or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    return {m.group(1) for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e)
            if not m.group(2) and m.group(1).lower() not in _KEYWORDS}


def label_names(expr: str, legend: str = "") -> set[str]:
    """Label names an expression matches on or groups by, and those its legend shows (``{{name}}``)."""
    names = set(re.findall(r"[{,]\s*([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", expr))
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        names |= {g.strip() for g in group.split(",") if g.strip()}
    return names | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def test_metric_names_are_extracted_from_promql():
    assert metric_names('histogram_quantile(0.99, sum by (le, method) (rate(edgerec_request_duration_seconds_bucket'
                        '{instance=~"$instance", method!="x"}[$__rate_interval])))') \
        == {"edgerec_request_duration_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / on (instance) group_left (version) b_info * 1e3 + c offset 5m") \
        == {"a_total", "b_info", "c"}
    assert metric_names('max by (state) (edgerec_sync_state{state="idle"}) == bool 1') == {"edgerec_sync_state"}
    assert label_names('sum by (le, method) (x{instance=~"$i", code!="0"})', "{{method}} {{ code }}") \
        == {"le", "method", "instance", "code"}


def _panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 36
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    panels = list(_panels(dash))
    assert len({p["id"] for p in panels}) == len(panels)
    taken: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] >= 1, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def _exported(mport: int) -> dict[str, tuple[str, set[str]]]:
    """{series name: (its family's type, the label names its samples carry)} of a node's /metrics: the samples'
    own names and, for families without samples yet, the names their type gives them."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    out: dict[str, tuple[str, set[str]]] = {}
    for fam in text_string_to_metric_families(text):
        for suffix in _SUFFIXES[fam.type]:
            out.setdefault(fam.name + suffix, (fam.type, set()))
        for s in fam.samples:
            out.setdefault(s.name, (fam.type, set()))[1].update(s.labels)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bundle, beauty_data):
    """What a node with every optional part on exports after some traffic (a track, recommends, a bad request)."""
    tmp = tmp_path_factory.mktemp("grafana")
    shutil.copytree(tiny_bundle, tmp / "b")
    key, pub = signing.keygen(tmp / "signer")
    signing.sign_bundle(tmp / "b", signing.load_private_key(key))
    port, mport, dead = free_port(), free_port(), f"127.0.0.1:{free_port()}"
    proc = start_daemon(tmp / "b", port, ["--state-dir", str(tmp / "s"), "--trusted-key", str(pub), "--registry",
                                          dead, "--upstream", dead, "--no-discovery", "--metrics-port", str(mport)],
                        log_path=tmp / "node.log")
    try:
        with Client("127.0.0.1", port) as c:
            c.call("track", user="grafana-shopper", item=beauty_data.item_ids[0], event="view")
            for _ in range(2):
                c.call("recommend", user="grafana-shopper", k=5)
            with pytest.raises(RpcError):
                c.call("recommend", k="many")
        yield _exported(mport)
    finally:
        assert stop_daemon(proc) == 0


def test_every_panel_query_names_a_metric_the_node_exports(exported):
    dash = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"], t.get("legendFormat", "")) for p in _panels(dash) for t in p.get("targets", [])]
    queries += [("variable " + v["name"], re.sub(r"label_values\((\w+),\s*(\w+)\)", r"\1", v["query"]["query"]), "")
                for v in dash["templating"]["list"] if v["type"] == "query"]
    used: set[str] = set()
    for title, expr, legend in queries:
        names = metric_names(expr)
        assert names, (title, expr)
        missing = names - exported.keys()
        assert not missing, f"{title}: {expr} names {missing}, which the node does not export"
        used |= names
        for fn, name in re.findall(r"\b(rate|irate|increase)\(\s*([A-Za-z_:][\w:]*)", expr):
            kind = exported[name][0]
            assert kind in ("counter", "histogram") and not name.endswith(("_created", "_max")), (title, fn, name)
        if "histogram_quantile" in expr:
            assert any(n.endswith("_bucket") and exported[n][0] == "histogram" for n in names), (title, expr)
        carried = set().union(*(exported[n][1] for n in names)) | TARGET_LABELS
        if all(exported[n][1] for n in names):   # families with samples: their label names are known
            assert label_names(expr, legend) <= carried, (title, label_names(expr, legend) - carried)
    # what issue 17 asks the dashboard to show
    for name in ("edgerec_requests_total", "edgerec_request_duration_seconds_bucket", "edgerec_errors_total",
                 "edgerec_cache_hits_total", "edgerec_cache_misses_total", "edgerec_sessions",
                 "edgerec_events_per_second", "edgerec_model_info", "edgerec_model_age_seconds",
                 "edgerec_sync_state", "edgerec_sync_registry_reachable", "edgerec_top_item_events_1h"):
        assert name in used, name
