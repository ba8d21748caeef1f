using System.Text.Json;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>One row of <c>qemu-img snapshot -l</c>, split into its columns.</summary>
internal sealed record SnapshotRow(string Id, string Tag, string VmSize, string Date, string VmClock, string Icount);

/// <summary>One snapshot as <c>qemu-img info --output=json</c> reports it (QEMU's own numbers).</summary>
internal sealed record QemuSnapshotInfo(string Id, string Name, long VmStateSize, long DateSec, long DateNsec, long VmClockNsec, long? Icount);

/// <summary>Helpers for the snapshot tests: QEMU's views of an image's snapshots and their content.</summary>
internal static class SnapshotKit
{
    /// <summary>
    /// Parses <c>qemu-img snapshot -l</c> output. QEMU 7.2 prints "%-9s %-16s %8s%20s%13s%11s" under
    /// "ID        TAG"; QEMU 10.0 (measured) prints the ID in 7 columns under "ID      TAG", and 4-digit clock
    /// hours, and "--" where there is no icount (7.2: nothing; parsed as ""). With IDs and names shorter
    /// than their columns those two are cut at fixed positions; the rest is matched by shape, since a
    /// clock or icount wider than its column runs into its neighbour.
    /// </summary>
    internal static List<SnapshotRow> ParseList(string output)
    {
        var rows = new List<SnapshotRow>();
        string[] lines = output.Split('\n');
        int i = 0;
        if (lines.Length == 0 || lines[0].Length == 0) return rows;
        Assert.Equal("Snapshot list:", lines[i++]);
        bool narrowId = lines[i].StartsWith(Qemu10ListHeading, StringComparison.Ordinal);
        Assert.True(narrowId || lines[i].StartsWith(Qemu72ListHeading, StringComparison.Ordinal), $"not qemu-img's heading: '{lines[i]}'");
        i++;
        int idWidth = narrowId ? 7 : 9;
        var shape = new System.Text.RegularExpressions.Regex(@"^\s*(\S+ \S*B)\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s*(-?\d+:-?\d\d:-?\d\d\.-?\d\d\d)\s*(-?\d*|--)$");
        for (; i < lines.Length; i++)
        {
            string l = lines[i];
            if (l.Length == 0) continue;
            System.Text.RegularExpressions.Match m = shape.Match(l[(idWidth + 18)..]);
            Assert.True(m.Success, $"row not in qemu-img's shape: '{l}'");
            rows.Add(new SnapshotRow(l[..idWidth].TrimEnd(), l[(idWidth + 1)..(idWidth + 17)].TrimEnd(), m.Groups[1].Value, m.Groups[2].Value, m.Groups[3].Value,
                m.Groups[4].Value == "--" ? "" : m.Groups[4].Value));
        }
        return rows;
    }

    private const string Qemu72ListHeading = "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT";
    private const string Qemu10ListHeading = "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT";

    /// <summary>A VM clock of <c>hh:mm:ss.mmm</c> as this test's <c>qemu-img snapshot -l</c> prints it (QEMU 10.0: 4-digit hours).</summary>
    internal static string ListedClock(string clock) => QemuInstall.Current.AtLeast(10, 0) ? "00" + clock : clock;

    /// <summary>
    /// Asserts vmsnap's <c>snapshot list</c> (which prints QEMU 7.2's table) is what this test's qemu-img prints:
    /// byte for byte on 7.2; on 10.0, whose table is laid out otherwise, the same rows with the same values.
    /// </summary>
    internal static void AssertSameListing(string qemuListing, string vmsnapListing)
    {
        if (!QemuInstall.Current.AtLeast(10, 0))
        {
            Assert.Equal(qemuListing, vmsnapListing);
            return;
        }
        string[] theirs = qemuListing.Split('\n'), ours = vmsnapListing.Split('\n');
        Assert.True(theirs.Length == ours.Length, $"{QemuInstall.Current} lists {theirs.Length} lines, vmsnap {ours.Length}:\n{qemuListing}\n{vmsnapListing}");
        if (theirs.Length < 2) { Assert.Equal(qemuListing, vmsnapListing); return; }
        Assert.Equal(theirs[0], ours[0]);
        Assert.Equal(Qemu10ListHeading, theirs[1].TrimEnd());
        Assert.Equal(Qemu72ListHeading, ours[1].TrimEnd());
        for (int i = 2; i < theirs.Length; i++)
            Assert.True(RowValues(theirs[i]) == RowValues(ours[i]), $"row {i - 1}: {QemuInstall.Current} '{theirs[i]}', vmsnap '{ours[i]}'");
    }

    /// <summary>A listed row's values, whatever the layout: ID, tag, VM size, date, clock as numbers, icount ("" for none).</summary>
    private static string RowValues(string row)
    {
        if (row.Length == 0) return "";
        System.Text.RegularExpressions.Match m = System.Text.RegularExpressions.Regex.Match(row,
            @"^(\S+)\s+(\S+)\s+(\S+ \S*B)\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s*(-?\d+):(-?\d\d):(-?\d\d)\.(-?\d\d\d)\s*(-?\d*|--)$");
        Assert.True(m.Success, $"row not in qemu-img's shape: '{row}'");
        return string.Join('|', m.Groups.Values.Skip(1).Select((g, k) => k is >= 4 and <= 7 ? long.Parse(g.Value, System.Globalization.CultureInfo.InvariantCulture).ToString(System.Globalization.CultureInfo.InvariantCulture)
            : g.Value == "--" ? "" : g.Value));
    }

    internal static List<SnapshotRow> QemuList(string image) => ParseList(Tool.QemuImg("snapshot", "-l", image));

    internal static List<QemuSnapshotInfo> QemuInfo(string image)
    {
        JsonElement info = Qemu.Info(image);
        var list = new List<QemuSnapshotInfo>();
        if (!info.TryGetProperty("snapshots", out JsonElement snaps)) return list;
        foreach (JsonElement s in snaps.EnumerateArray())
        {
            list.Add(new QemuSnapshotInfo(
                s.GetProperty("id").GetString()!, s.GetProperty("name").GetString()!, s.GetProperty("vm-state-size").GetInt64(),
                s.GetProperty("date-sec").GetInt64(), s.GetProperty("date-nsec").GetInt64(),
                s.GetProperty("vm-clock-sec").GetInt64() * 1_000_000_000 + s.GetProperty("vm-clock-nsec").GetInt64(),
                s.TryGetProperty("icount", out JsonElement ic) ? ic.GetInt64() : null));
        }
        return list;
    }

    /// <summary>Asserts vmsnap's snapshot records carry QEMU's numbers for the same image.</summary>
    internal static void AssertSameAsQemuInfo(IReadOnlyList<Qcow2Snapshot> ours, string image)
    {
        List<QemuSnapshotInfo> theirs = QemuInfo(image);
        Assert.Equal(theirs.Count, ours.Count);
        for (int i = 0; i < ours.Count; i++)
        {
            QemuSnapshotInfo q = theirs[i];
            Qcow2Snapshot s = ours[i];
            Assert.Equal(q.Id, s.Id);
            Assert.Equal(q.Name, s.Name);
            Assert.Equal(q.VmStateSize, s.VmStateSize);
            Assert.Equal(q.DateSec, s.Date.ToUnixTimeSeconds());
            Assert.Equal(q.DateNsec, s.Date.UtcTicks % TimeSpan.TicksPerSecond * 100);
            Assert.Equal(q.VmClockNsec, s.VmClock);
            if (q.Icount is long icount) Assert.Equal(icount, s.Icount);
        }
    }

    /// <summary>The snapshot's disk as QEMU reads it (<c>qemu-img convert -l snapshot.name=TAG</c>).</summary>
    internal static byte[] QemuSnapshotContent(string image, string name, TempDir dir)
    {
        string raw = dir.File($"snap-{Guid.NewGuid():N}.raw");
        Tool.QemuImg("convert", "-U", "-l", $"snapshot.name={name}", "-O", "raw", image, raw);
        byte[] bytes = File.ReadAllBytes(raw);
        File.Delete(raw);
        return bytes;
    }

    /// <summary>The active disk as QEMU reads it.</summary>
    internal static byte[] QemuActiveContent(string image, TempDir dir)
    {
        string raw = dir.File($"active-{Guid.NewGuid():N}.raw");
        Tool.QemuImg("convert", "-U", "-O", "raw", image, raw);
        byte[] bytes = File.ReadAllBytes(raw);
        File.Delete(raw);
        return bytes;
    }

    internal static void AssertEqualBytes(byte[] expected, byte[] actual, string what)
    {
        Assert.True(expected.Length == actual.Length, $"{what}: {actual.Length} bytes, expected {expected.Length}");
        int at = expected.AsSpan().CommonPrefixLength(actual);
        Assert.True(at == expected.Length, $"{what}: bytes differ first at offset {at}");
    }
}
