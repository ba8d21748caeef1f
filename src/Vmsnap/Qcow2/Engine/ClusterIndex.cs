namespace Vmsnap.Qcow2;

/// <summary>
/// The host clusters a set of cluster-sized tables occupies (active L2 tables, refcount blocks),
/// counted (two entries may point to the same table), kept up to date as entries change, so that
/// "does this write hit one of them" is a few lookups, whatever the number of tables.
/// </summary>
internal sealed class ClusterIndex(int clusterBits)
{
    private readonly Dictionary<long, int> _clusters = [];

    internal int Count => _clusters.Count;

    /// <summary>Counts the table at <paramref name="offset"/> (one cluster long, aligned or not; 0 is none).</summary>
    internal void Add(long offset)
    {
        if (offset == 0) return;
        foreach (long c in Clusters(offset)) _clusters[c] = _clusters.GetValueOrDefault(c) + 1;
    }

    /// <summary>Forgets one count of the table at <paramref name="offset"/>.</summary>
    internal void Remove(long offset)
    {
        if (offset == 0) return;
        foreach (long c in Clusters(offset))
        {
            if (!_clusters.TryGetValue(c, out int n)) continue;
            if (n <= 1) _clusters.Remove(c);
            else _clusters[c] = n - 1;
        }
    }

    internal void Clear() => _clusters.Clear();

    /// <summary>True when a table occupies any of the clusters <paramref name="first"/>..<paramref name="last"/>.</summary>
    internal bool Any(long first, long last)
    {
        if (_clusters.Count == 0 || last < first) return false;
        if ((ulong)(last - first) < (ulong)_clusters.Count)
        {
            for (long c = first; c <= last; c++) if (_clusters.ContainsKey(c)) return true;
            return false;
        }
        foreach (long c in _clusters.Keys) if (c >= first && c <= last) return true;
        return false;
    }

    private (long, long) Span(long offset) => (offset >> clusterBits, (offset + (1L << clusterBits) - 1) >> clusterBits);

    private IEnumerable<long> Clusters(long offset)
    {
        (long first, long last) = Span(offset);
        yield return first;
        if (last != first) yield return last;
    }
}
