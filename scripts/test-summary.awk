# Summarises `cargo test` output (stdout and stderr together): one line per test binary with
# its result, counts and time, then a last line "N passed, N failed". A binary that started
# but printed no result (it crashed) counts as one failure.
function flush_pending() {
    if (label != "") {
        rows[++n] = sprintf("  %-7s %5s passed %4s failed %9s  %s", "CRASHED", "-", "-", "-", label)
        failed += 1
        label = ""
    }
}
/^ *Running / {
    flush_pending()
    label = $0
    sub(/^ *Running /, "", label)
    if ($NF ~ /^\(.*\)$/) {
        bin = $NF; gsub(/[()]/, "", bin); k = split(bin, parts, "/"); b = parts[k]
        sub(/-[0-9a-f]+$/, "", b)
        sub(/ \([^ ]*\)$/, "", label)
        label = label " [" b "]"
    }
    next
}
/^ *Doc-tests / { flush_pending(); label = "doc-tests " $2; next }
/^test result: / {
    status = $3; sub(/\.$/, "", status)
    p = $4; f = $6; t = $NF
    passed += p; failed += f
    if (label == "") label = "(unnamed)"
    rows[++n] = sprintf("  %-7s %5d passed %4d failed %9s  %s", (f > 0 || status != "ok") ? "FAILED" : "ok", p, f, t, label)
    label = ""
    next
}
END {
    flush_pending()
    print ""
    print "test binaries:"
    for (i = 1; i <= n; i++) print rows[i]
    printf "%d passed, %d failed\n", passed, failed
}
