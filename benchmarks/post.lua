-- wrk script: POST the JSON body in the file named by the BODY_FILE environment variable.
local file = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
wrk.headers["Content-Type"] = "application/json"
file:close()

function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format("RESULT requests=%d seconds=%.3f errors=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration / 1e6, errors,
    latency:percentile(50), latency:percentile(99)))
end
