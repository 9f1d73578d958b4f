#!/bin/sh
# Start one region of the compose deployment: format the volume (primary region
# only, once), wait until it exists, then serve the mount with its metrics (on
# every interface of the container: Prometheus scrapes it over the compose network).
set -eu
: "${TIDEFS_VOLUME:?}" "${TIDEFS_JOURNAL:?}" "${TIDEFS_REGION:?}"
MNT=/mnt/tidefs
mkdir -p "$MNT" /var/lib/tidefs

exists() {
    [ -n "$(tidefs log "$TIDEFS_VOLUME" --journal "$TIDEFS_JOURNAL" --limit 1 2>/dev/null)" ]
}

tries=0
until exists; do
    tries=$((tries + 1))
    if [ "$tries" -gt 90 ]; then
        echo "tidefs-$TIDEFS_REGION: volume $TIDEFS_VOLUME never appeared in $TIDEFS_JOURNAL" >&2
        exit 1
    fi
    if [ "${TIDEFS_FORMAT:-0}" = 1 ]; then
        tidefs format "$TIDEFS_VOLUME" --journal "$TIDEFS_JOURNAL" \
            --region "east=$TIDEFS_STORE_EAST" --region "west=$TIDEFS_STORE_WEST" || true
    fi
    sleep 2
done

exec tidefs mount "$TIDEFS_VOLUME" "$MNT" --journal "$TIDEFS_JOURNAL" --region "$TIDEFS_REGION" \
    --state-dir /var/lib/tidefs/state --cache-dir /var/lib/tidefs/cache \
    --metrics-addr "0.0.0.0:${TIDEFS_METRICS_PORT:-9464}" --foreground
