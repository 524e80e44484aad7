"""One line from `wrk --latency` output on stdin: requests/s, p50 ms, p99 ms, non-2xx,
socket errors."""
import re, sys
text = sys.stdin.read()
def ms(label):
    m = re.search(r"^\s+" + label + r"%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
errors = re.search(r"Socket errors: (.*)", text)
error_text = errors.group(1).replace(" ", "_") if errors else "none"
print("%.0f %.2f %.2f %s %s" % (rps, ms("50"), ms("99"), bad.group(1) if bad else 0, error_text))
