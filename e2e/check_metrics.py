"""Parses a /metrics scrape (stdin) as OpenMetrics with the Prometheus project's own strict
parser (prometheus_client.openmetrics), which refuses what a Prometheus server scraping it as
OpenMetrics would: a missing `# EOF`, samples that do not belong to their family (a counter's
`_total`), malformed labels. Prints {"families": N, "samples": M, "names": [...]} or exits 1
with the error."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main():
    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError, and others on malformed input
        print(f"not valid OpenMetrics: {e}", file=sys.stderr)
        sys.exit(1)
    samples = sum(len(f.samples) for f in families)
    print(json.dumps({"families": len(families), "samples": samples,
                      "names": sorted(f.name for f in families)}))


if __name__ == "__main__":
    main()
