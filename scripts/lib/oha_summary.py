"""One line from oha's JSON report on stdin: requests/s, p50 ms, p99 ms, non-2xx."""
import json, sys
report = json.load(sys.stdin)
percentiles = report["latencyPercentiles"]
bad = sum(n for code, n in report["statusCodeDistribution"].items() if not code.startswith("2"))
print("%.0f %.2f %.2f %d" % (
    report["summary"]["requestsPerSec"],
    (percentiles["p50"] or 0) * 1000,
    (percentiles["p99"] or 0) * 1000,
    bad + sum(report.get("errorDistribution", {}).values()),
))
