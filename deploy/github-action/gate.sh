#!/usr/bin/env bash
# The action's one step: runs `canaryd gate --wait` with the action's inputs (INPUT_*), from the
# image when one is named, else from the binary (downloaded first when it is a URL). canaryd gate
# itself writes verdict=... to GITHUB_OUTPUT and the checks to GITHUB_STEP_SUMMARY; its exit code
# is the step's.
set -euo pipefail

for required in INPUT_SERVER INPUT_APP INPUT_VERSION; do
  if [ -z "${!required:-}" ]; then
    echo "::error::the ${required#INPUT_} input is required" | tr '[:upper:]' '[:lower:]' >&2
    exit 3
  fi
done

args=(gate --wait
  --server "$INPUT_SERVER"
  --env "${INPUT_ENV:-default}"
  --app "$INPUT_APP"
  --version "$INPUT_VERSION"
  --timeout "${INPUT_TIMEOUT:-30m}")
if [ -n "${INPUT_GRPC:-}" ]; then
  args+=(--grpc "$INPUT_GRPC")
fi

if [ -n "${INPUT_IMAGE:-}" ]; then
  # The runner's files for outputs and the summary, mounted where the container sees them, and
  # written as the runner's user (the image's own user is not the owner of those files).
  output="${GITHUB_OUTPUT:-/dev/null}"
  summary="${GITHUB_STEP_SUMMARY:-/dev/null}"
  exec docker run --rm --network host --user "$(id -u):$(id -g)" \
    -e CANARYD_TOKEN -e GITHUB_OUTPUT=/github/output -e GITHUB_STEP_SUMMARY=/github/summary \
    -v "$output:/github/output" -v "$summary:/github/summary" \
    "$INPUT_IMAGE" "${args[@]}"
fi

binary="${INPUT_BINARY:-}"
if [ -z "$binary" ]; then
  echo "::error::set the image input or the binary input" >&2
  exit 3
fi
case "$binary" in
  http://* | https://* | file://*)
    downloaded="${RUNNER_TEMP:-$(mktemp -d)}/canaryd"
    curl --fail --silent --show-error --location --retry 3 --output "$downloaded" "$binary"
    chmod +x "$downloaded"
    binary="$downloaded"
    ;;
esac
exec "$binary" "${args[@]}"
