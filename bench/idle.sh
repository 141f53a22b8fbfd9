# Sourced by the speed scripts: `idle` returns once the CPU is at least 90 % idle over 2 s (or
# after 2 minutes), so that a timed run does not share the machine with a build.
idle() { python3 - <<'PY'
import time
def busy():
    a=[int(x) for x in open('/proc/stat').readline().split()[1:]]; return a[3]+a[4], sum(a)
for _ in range(60):
    i0,t0=busy(); time.sleep(2); i1,t1=busy()
    if (i1-i0)/(t1-t0) > 0.9: break
PY
}
