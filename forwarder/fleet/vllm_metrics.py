"""Reading a backend's load from its Prometheus `/metrics` body.

vLLM reports `vllm:num_requests_running` and `vllm:num_requests_waiting` as gauges with one series
per engine (and model); a backend's figure is the sum over its series. Its KV-cache use is
`vllm:kv_cache_usage_perc` (vLLM V1; `vllm:gpu_cache_usage_perc` in V0 and 0.8–0.10), from 0 to 1;
a backend's figure is the highest over its engines, the one that preempts first. A figure is None
when its gauge is absent or its lines cannot be read.

A real two-engine body is ~88 KB and a full parse with prometheus_client costs ~22 ms of CPU,
which on a gevent worker stalls every relayed stream for that long. So a regular expression first
picks out just the `# HELP`/`# TYPE` lines and samples of the wanted gauges, and only those lines
go through prometheus_client's parser: labels with commas or escaped quotes are still parsed right.
"""

import re

from prometheus_client.parser import text_string_to_metric_families

# Each figure read, from which gauges (the first one present counts), and how its series add up.
FIGURES = (
    ("num_requests_running", ("num_requests_running",), sum),
    ("num_requests_waiting", ("num_requests_waiting",), sum),
    ("kv_cache_usage", ("kv_cache_usage_perc", "gpu_cache_usage_perc"), max),
)
_GAUGES = tuple(gauge for _, gauges, _ in FIGURES for gauge in gauges)

# Every wanted gauge's name holds one of these. `str.find` skips through the body in C; a regular
# expression would try a match at each of its ~88,000 positions (1.2 ms against 0.2 ms here).
_NEEDLES = ("num_requests_", "_cache_usage_perc")
# A whole line of a wanted family: its HELP/TYPE comment or one of its samples. `vllm:` is vLLM's
# prefix; the bare name is accepted too, for servers that mimic vLLM without it.
_FAMILY_LINE = re.compile(r"(?:# (?:HELP|TYPE) )?((?:vllm:)?(?:%s))[\s{]" % "|".join(_GAUGES))


def _combine(lines: "list[str]", combine) -> "float | None":
    try:
        samples = [s for family in text_string_to_metric_families("\n".join(lines) + "\n")
                   for s in family.samples]
    except ValueError:
        return None
    if not samples:
        return None
    return combine(s.value for s in samples)


def read_load(body: str) -> "dict[str, float | None]":
    """`{"num_requests_running": x, "num_requests_waiting": y, "kv_cache_usage": z}`."""
    lines = {}
    seen = set()  # a line may hold both needles (a label naming the other gauge)
    for needle in _NEEDLES:
        at = body.find(needle)
        while at >= 0:
            line_start = body.rfind("\n", 0, at) + 1
            line_end = body.find("\n", at)
            if line_end < 0:
                line_end = len(body)
            if line_start not in seen:
                seen.add(line_start)
                line = body[line_start:line_end]
                family = _FAMILY_LINE.match(line)
                if family:
                    lines.setdefault(family.group(1), []).append(line)
            at = body.find(needle, line_end)
    figures = {}
    for name, gauges, combine in FIGURES:
        figures[name] = None
        for gauge in gauges:
            family = lines.get("vllm:" + gauge) or lines.get(gauge)
            if family:
                figures[name] = _combine(family, combine)
                break
    return figures
