"""Generate docs/observability.md from agent/metrics.py, so the metrics reference cannot drift.

python -m agent.metrics_docs --write     # rewrites docs/observability.md
python -m agent.metrics_docs --check     # exit 1 if the committed file is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from agent.docgen import generated_doc_main
from agent.metrics import Metrics, _Def

REGENERATE = "python -m agent.metrics_docs --write"
DOC = Path(__file__).resolve().parent.parent / "docs" / "observability.md"

_INTRO = f"""\
# Observability: metrics, alerts, dashboard, status

Generated from `agent/metrics.py` by `{REGENERATE}`; a test fails when it is
stale.

- **Metrics**: `GET /metrics` on the Unix socket, and on `metrics.listen`
  (TCP, e.g. `127.0.0.1:9464`) for Prometheus to scrape. Besides the table
  below: `secrets_agent_build_info{{version}}` and prometheus_client's
  `process_*` metrics (CPU, resident memory, open descriptors).
- **Error series exist at 0 from the start** (refresh, fetch, decrypt,
  version-check, notify and reload errors; per rotation rule and per
  template once the config names them), so `increase()` sees the first error.
- **Labels are bounded**: outcomes, triggers, steps, key providers, and the
  names the config gives (templates, rotation rules); never secret values or
  callers.
- **Alerts**: [examples/prometheus/alerts.yml](../examples/prometheus/alerts.yml)
  (secret stale, refresh failing, rotation failing, key revoked, render
  failing, not ready, down), unit-tested with `promtool test rules`
  ([alerts_test.yml](../examples/prometheus/alerts_test.yml)).
- **Dashboard**: [examples/grafana/secrets-agent.json](../examples/grafana/secrets-agent.json).
- **Status**: `secrets-agent status` (a table; `--json` for scripts) shows
  each secret's version, stages, last check, staleness and error, and each
  template's last render and notification. A caller sees the details only if
  an access rule names it; `stages: []` grants status without values.

| metric | type | labels | meaning |
|---|---|---|---|
"""


def reference() -> str:
    """The whole of docs/observability.md."""
    metrics = Metrics()
    rows = []
    for definition in vars(Metrics).values():
        if not isinstance(definition, _Def):
            continue
        metric = getattr(metrics, definition.attr)
        name = metric._name
        if isinstance(metric, Counter):
            kind, name = "counter", f"{name}_total"
        elif isinstance(metric, Histogram):
            kind = "histogram"
        else:
            assert isinstance(metric, Gauge)
            kind = "gauge"
        labels = ", ".join(f"`{label}`" for label in metric._labelnames) or "-"
        doc = metric._documentation.replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | {labels} | {doc} |")
    return _INTRO + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    return generated_doc_main(argv, module="agent.metrics_docs", doc=DOC, reference=reference)


if __name__ == "__main__":
    sys.exit(main())
