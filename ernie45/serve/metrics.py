"""Prometheus text for /metrics: request counts by status, tokens, latency, queue depth and cache use."""

from __future__ import annotations

import threading
from collections import Counter

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.disconnects = 0
        self.media_cancelled = 0  # media decodes stopped because their client left

    def observe(self, route: str, status: int, seconds: float | None = None) -> None:
        with self.lock:
            self.requests[(route, status)] += 1
            if seconds is not None:
                self.latency_sum += seconds
                i = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
                self.latency[i] += 1

    def render(self, engine) -> str:
        s, u = engine.stats, engine.usage()
        lines = ["# TYPE ernie45_requests_total counter"]
        with self.lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'ernie45_requests_total{{route="{route}",status="{status}"}} {n}')
            lines.append("# TYPE ernie45_request_latency_seconds histogram")
            total = 0
            for b, n in zip([*BUCKETS, float("inf")], self.latency, strict=True):
                total += n
                le = "+Inf" if b == float("inf") else b
                lines.append(f'ernie45_request_latency_seconds_bucket{{le="{le}"}} {total}')
            lines += [f"ernie45_request_latency_seconds_sum {self.latency_sum:.6f}",
                      f"ernie45_request_latency_seconds_count {total}",
                      f"ernie45_client_disconnects_total {self.disconnects}",
                      f"ernie45_media_decodes_cancelled_total {self.media_cancelled}"]  # fmt: skip
        gauges = {
            "ernie45_prompt_tokens_total": s["prompt_tokens"],
            "ernie45_completion_tokens_total": s["completion_tokens"],
            "ernie45_engine_requests_total": s["requests"], "ernie45_engine_aborted_total": s["aborted"],
            "ernie45_engine_steps_total": s["steps"],
            "ernie45_draft_tokens_total": s["draft_tokens"],
            "ernie45_accepted_draft_tokens_total": s["accepted_tokens"],
            "ernie45_unspeculated_requests_total": s["unspeculated_requests"],
            "ernie45_time_to_first_token_seconds_sum": round(s["ttft_sum"], 6),
            "ernie45_queue_depth": u["waiting"], "ernie45_running_requests": u["running"],
            "ernie45_cache_slots_used": u["running"], "ernie45_cache_slots_total": u["slots"],
            "ernie45_cache_tokens_used": u["cache_tokens"], "ernie45_cache_tokens_capacity": u["cache_capacity"],
        }  # fmt: skip
        for name, value in gauges.items():
            kind = "counter" if name.endswith("_total") or name.endswith("_sum") else "gauge"
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
