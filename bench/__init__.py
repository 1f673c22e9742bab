"""senderd's benchmark: `python -m bench` (full, about 10 minutes) or `python -m bench --quick` (under 2).

One module per measurement, each with `async def measure(mode, workdir) -> dict`: throughput, tokens,
schedule, footprint, newman, relay. Shared helpers: `proc` (subprocess CPU and RSS from /proc), `peers`
(finding wrk, nginx, blackbox_exporter, newman; starting nginx), `common`. Everything runs on 127.0.0.1;
the results go to bench/results/latest.json and a markdown table on stdout.
"""
