# Reads "fio ROUND MIB" and "cfg ROUND CONFIG MIB" lines (one fio run and several configurations per
# round) and prints, per configuration, its MiB/s in every round, its ratio to the same round's fio
# figure, and the median ratio. Used by the interleaved *-vs-fio.sh benchmarks.
$1 == "fio" { fio[$2] = $3 }
$1 == "cfg" { n[$3]++; v[$3] = v[$3] " " int($4); r[$3, n[$3]] = 100 * $4 / fio[$2]; order[$3] = 1 }
END {
  printf "%-16s %-44s %s\n", "config", (label ? label : "MiB/s") " per round", "% of same-round fio (median)"
  for (c in order) {
    m = n[c]; for (i = 1; i <= m; i++) a[i] = r[c, i]
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
    s = ""; for (i = 1; i <= m; i++) s = s sprintf(" %.0f", r[c, i])
    printf "%-16s %-44s %s  (%.0f)\n", c, v[c], s, med
  }
}
