"""Unit tests for reading load figures from real-format vLLM `/metrics` bodies."""

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.fleet.vllm_metrics import read_load

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BODIES = [
    "metrics_v0.11.0_V1_single-engine_harness.prom",
    "metrics_v0.11.0_V1_dp2_single-apiserver_harness.prom",
    "metrics_v0.11.0_V1_dp2_multiprocess-mode_harness.prom",
    "metrics_v0.6.6_V0_multiprocess_harness.prom",
]


def full_parse_figures(body):
    """The figures as a full, slow parse of the whole body gives them."""
    families = {family.name: [s.value for s in family.samples]
                for family in text_string_to_metric_families(body)}
    kv = families.get("vllm:kv_cache_usage_perc", families.get("vllm:gpu_cache_usage_perc"))
    return {"num_requests_running": sum(families["vllm:num_requests_running"]),
            "num_requests_waiting": sum(families["vllm:num_requests_waiting"]),
            "kv_cache_usage": max(kv)}


@pytest.mark.parametrize("name", BODIES)
def test_figures_match_a_full_parse(name):
    body = (FIXTURES / name).read_text()
    assert read_load(body) == full_parse_figures(body)


def test_two_engines_are_summed():
    body = (FIXTURES / BODIES[1]).read_text()
    running = [line for line in body.splitlines()
               if line.startswith("vllm:num_requests_running{")]
    assert len(running) == 2  # one series per engine
    figures = read_load(body)
    assert figures["num_requests_running"] == sum(float(line.rsplit(" ", 1)[1])
                                                  for line in running)


def test_labels_with_commas_and_escaped_quotes():
    body = (
        '# TYPE vllm:num_requests_waiting gauge\n'
        'vllm:num_requests_waiting{model_name="a,b",engine="0"} 2.0\n'
        'vllm:num_requests_waiting{model_name="say \\"hi\\" }",engine="1"} 3.0\n'
    )
    assert read_load(body) == {"num_requests_running": None, "num_requests_waiting": 5.0,
                               "kv_cache_usage": None}


def test_absent_gauges_are_none():
    assert read_load("# TYPE vllm:other gauge\nvllm:other 1\n") == {
        "num_requests_running": None, "num_requests_waiting": None, "kv_cache_usage": None}


def test_malformed_gauge_lines_are_none_and_the_other_gauge_still_reads():
    body = ('vllm:num_requests_running{engine="0" 1 2 3\n'
            '# TYPE vllm:num_requests_waiting gauge\n'
            'vllm:num_requests_waiting{engine="0"} 4\n')
    assert read_load(body) == {"num_requests_running": None, "num_requests_waiting": 4.0,
                               "kv_cache_usage": None}


def test_not_prometheus_text_at_all():
    assert read_load("<html>oops</html>") == {
        "num_requests_running": None, "num_requests_waiting": None, "kv_cache_usage": None}


def test_kv_cache_is_the_highest_engine_and_v1_names_win_over_v0():
    body = ('# TYPE vllm:kv_cache_usage_perc gauge\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75\n'
            '# TYPE vllm:gpu_cache_usage_perc gauge\n'
            'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n')
    assert read_load(body)["kv_cache_usage"] == 0.75
    v0 = body.split("# TYPE vllm:gpu", 1)[1]
    assert read_load("# TYPE vllm:gpu" + v0)["kv_cache_usage"] == 0.5
