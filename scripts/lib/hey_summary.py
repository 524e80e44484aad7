"""One line from `hey` output on stdin: requests/s, p50 ms, p99 ms, non-2xx."""
import re, sys
text = sys.stdin.read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
def pct(p):
    return float(re.search(r"\s%d%% in ([\d.]+) secs" % p, text).group(1)) * 1000
codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", text))
bad = sum(int(n) for c, n in codes.items() if not c.startswith("2"))
print("%.0f %.2f %.2f %d" % (rps, pct(50), pct(99), bad))
