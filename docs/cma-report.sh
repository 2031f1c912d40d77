#!/bin/sh
# cma-report.sh: what each CMA area holds, and a test allocation traced, read
# from the kernel's own files (mm/cma_sysfs.c, mm/cma_debug.c, the cma trace
# events).  Written for a kernel with CONFIG_CMA_SYSFS and CONFIG_CMA_DEBUGFS,
# run as root:
#     ./cma-report.sh                          # on a kernel
#     ROOT=/run/cma/kernel ./cma-report.sh     # on cmad: only the root changes
set -eu
ROOT=${ROOT:-}
SYS=$ROOT/sys/kernel/mm/cma
DBG=$ROOT/sys/kernel/debug/cma
TRACING=$ROOT/sys/kernel/tracing
PAGES=${PAGES:-16}

# What Android's libmeminfo does: pages in use, summed over every area.
in_use=0
for area in "$SYS"/*; do
    s=$(cat "$area/alloc_pages_success")
    r=$(cat "$area/release_pages_success")
    in_use=$((in_use + s - r))
done
echo "CMA in use: $in_use pages ($((in_use * 4)) kB)"

printf '%-12s %10s %10s %10s %10s %10s\n' area total available success fail released
for area in "$SYS"/*; do
    printf '%-12s %10s %10s %10s %10s %10s\n' "$(basename "$area")" \
        "$(cat "$area/total_pages")" "$(cat "$area/available_pages")" \
        "$(cat "$area/alloc_pages_success")" "$(cat "$area/alloc_pages_fail")" \
        "$(cat "$area/release_pages_success")"
done

# The debugfs test hook on one area, with the trace events on.
area=${AREA:-$(ls "$SYS" | head -n 1)}
log=$(mktemp)
echo 1 > "$TRACING/events/cma/enable"
cat "$TRACING/trace_pipe" > "$log" &
reader=$!
used=$(cat "$DBG/$area/used")
echo "$PAGES" > "$DBG/$area/alloc"
echo "$area: used $used -> $(cat "$DBG/$area/used") pages, largest free run" \
     "$(cat "$DBG/$area/maxchunk") pages, base_pfn $(cat "$DBG/$area/base_pfn")"
echo "$((PAGES / 2))" > "$DBG/$area/free"
echo "$PAGES" > "$DBG/$area/free"
sleep 1
kill "$reader"
wait "$reader" 2>/dev/null || true
echo 0 > "$TRACING/events/cma/enable"
echo "trace: $(grep -c 'cma_alloc_finish:' "$log") allocations," \
     "$(grep -c 'cma_release:' "$log") releases"
grep -E 'cma_(alloc_finish|release):' "$log" | sed 's/^ *//'
rm -f "$log"
