# Sourced by the GPU drivers that run in the background (setsid) past one call's time limit:
# wait_for RUN WAIT waits up to WAIT seconds for the process whose pid is in RUN/pid, and
# still_running RUN says whether it is.
wait_for() {
  local pid
  pid=$(cat "$1/pid")
  for _ in $(seq 1 "$2"); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
}
still_running() { kill -0 "$(cat "$1/pid")" 2>/dev/null; }
