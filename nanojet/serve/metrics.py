"""The server's Prometheus metrics, written by hand in the text exposition format (0.0.4): vLLM's names with the
`nanojet:` prefix where vLLM has one, and the draft's acceptance, which is ours alone.

Tokens are counted as they come; everything else is read from each request as it ends: its finish reason, its
timestamps (`arrival_s`, `first_token_s`, `finish_s`) and `stats.accept_hist` (tokens per round). Both run on the
scheduler's thread and `exposition` on the event loop, so one lock guards the totals.
"""
import bisect
import threading
from collections import Counter
from collections.abc import Iterable

from nanojet.engine.request import Request

FINISH_REASONS = ("stop", "length", "abort", "error")  # OpenAI's (and vLLM's), as the server answers them
TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
TPOT_BOUNDS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)
E2E_BOUNDS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960)


class Histogram:
    """Observations counted in buckets with inclusive upper `bounds` (and one above them all), their sum and
    count."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def cumulative(self) -> list[int]:
        """Observations <= each bound, then all of them (le="+Inf")."""
        totals, running = [], 0
        for count in self.counts:
            running += count
            totals.append(running)
        return totals

    def samples(self, name: str) -> list[str]:
        totals = self.cumulative()
        lines = [f'{name}_bucket{{le="{bound:g}"}} {total}' for bound, total in zip(self.bounds, totals)]
        return lines + [f'{name}_bucket{{le="+Inf"}} {totals[-1]}', f"{name}_sum {self.sum}",
                        f"{name}_count {totals[-1]}"]


def family(name: str, kind: str, description: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {description}", f"# TYPE {name} {kind}", *samples]


class ServingMetrics:
    """Totals over the server's requests. `max_draft_depth`: the deepest draft a round verifies (None: plain
    decoding, and no acceptance metrics)."""

    def __init__(self, max_draft_depth: int | None):
        self.max_draft_depth = max_draft_depth
        self.prompt_tokens = self.generation_tokens = 0
        self.finished: Counter = Counter()
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BOUNDS), Histogram(TPOT_BOUNDS), Histogram(E2E_BOUNDS)
        self.accepted = Histogram(range(max_draft_depth + 1)) if max_draft_depth else None
        self._lock = threading.Lock()

    def record_tokens(self, request: Request, tokens: list[int]) -> None:
        """New tokens of `request`; with its first ones, its prompt has been prefilled."""
        with self._lock:
            if tokens and len(request.output_ids) == len(tokens):
                self.prompt_tokens += len(request.prompt_ids)
            self.generation_tokens += len(tokens)

    def record_finished(self, request: Request, finish_reason: str) -> None:
        """A request that has ended. Latencies count only answers that ran to their end (stop or length): an
        aborted one measures its client, not the server."""
        with self._lock:
            self.finished[finish_reason] += 1
            if finish_reason in ("stop", "length") and request.first_token_s is not None:
                self.ttft.observe(request.first_token_s - request.arrival_s)
                self.e2e.observe(request.finish_s - request.arrival_s)
                if len(request.output_ids) > 1:
                    self.tpot.observe((request.finish_s - request.first_token_s) / (len(request.output_ids) - 1))
            if self.accepted is not None:
                for tokens, rounds in request.stats.accept_hist.items():  # tokens per round, the bonus included
                    self.accepted.observe(max(tokens - 1, 0), rounds)

    def exposition(self) -> list[str]:
        """The counters and histograms as Prometheus text lines."""
        with self._lock:
            lines = family("nanojet:request_success_total", "counter", "Requests ended, by finish reason.",
                           [f'nanojet:request_success_total{{finished_reason="{reason}"}} {self.finished[reason]}'
                            for reason in FINISH_REASONS])
            lines += family("nanojet:prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                            [f"nanojet:prompt_tokens_total {self.prompt_tokens}"])
            lines += family("nanojet:generation_tokens_total", "counter", "Tokens generated.",
                            [f"nanojet:generation_tokens_total {self.generation_tokens}"])
            for name, histogram, description in (
                    ("time_to_first_token_seconds", self.ttft, "Seconds from arrival to the first token"),
                    ("time_per_output_token_seconds", self.tpot, "Mean seconds per token after the first"),
                    ("e2e_request_latency_seconds", self.e2e, "Seconds from arrival to the last token")):
                lines += family(f"nanojet:{name}", "histogram", f"{description}, per request that ran to its end.",
                                histogram.samples(f"nanojet:{name}"))
            return lines + self._acceptance()

    def _acceptance(self) -> list[str]:
        if self.accepted is None:
            return []
        totals = self.accepted.cumulative()
        rates = [(totals[-1] - totals[depth - 1]) / max(totals[-1], 1) for depth in range(1, self.max_draft_depth + 1)]
        return (family("nanojet:spec_decode_accepted_tokens_per_round", "histogram",
                       "Drafted tokens the target accepted per sequence-round (the bonus token not counted).",
                       self.accepted.samples("nanojet:spec_decode_accepted_tokens_per_round"))
                + family("nanojet:spec_decode_acceptance_rate", "gauge",
                         "Share of sequence-rounds that accepted at least `depth` drafted tokens.",
                         [f'nanojet:spec_decode_acceptance_rate{{depth="{depth}"}} {rate}'
                          for depth, rate in enumerate(rates, 1)]))
