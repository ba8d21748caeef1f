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
    /// Parses <c>qemu-img snapshot -l</c> output. QEMU prints "%-9s %-16s %8s%20s%13s%11s", so with
    /// IDs under 10 and names under 17 bytes those two are cut at fixed positions; the rest is
    /// matched by shape, since a clock or icount wider than its column runs into its neighbour.
    /// </summary>
    internal static List<SnapshotRow> ParseList(string output)
    {
        var rows = new List<SnapshotRow>();
        string[] lines = output.Split('\n');
        int i = 0;
        if (lines.Length == 0 || lines[0].Length == 0) return rows;
        Assert.Equal("Snapshot list:", lines[i++]);
        Assert.StartsWith("ID        TAG", lines[i++]);
        var shape = new System.Text.RegularExpressions.Regex(@"^\s*(\S+ \S*B)\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s*(-?\d+:-?\d\d:-?\d\d\.-?\d\d\d)\s*(-?\d*)$");
        for (; i < lines.Length; i++)
        {
            string l = lines[i];
            if (l.Length == 0) continue;
            System.Text.RegularExpressions.Match m = shape.Match(l[27..]);
            Assert.True(m.Success, $"row not in qemu-img's shape: '{l}'");
            rows.Add(new SnapshotRow(l[..9].TrimEnd(), l[10..26].TrimEnd(), m.Groups[1].Value, m.Groups[2].Value, m.Groups[3].Value, m.Groups[4].Value));
        }
        return rows;
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

    /// <summary>qemu-img check's counts: (corruptions, leaks, check errors, exit code, text).</summary>
    internal static (long Corruptions, long Leaks, long Errors, int Exit, string Text) Check(string image)
    {
        Tool.Result r = Tool.Run("qemu-img", ["check", "--output=json", image]);
        Assert.True(r.ExitCode is 0 or 2 or 3, $"qemu-img check failed ({r.ExitCode}): {r.Stderr}{r.Stdout}");
        JsonElement json = JsonDocument.Parse(r.Stdout).RootElement;
        return (Qemu.Field(json, "corruptions"), Qemu.Field(json, "leaks"), Qemu.Field(json, "check-errors"), r.ExitCode, r.Stderr + r.Stdout);
    }

    internal static void AssertEqualBytes(byte[] expected, byte[] actual, string what)
    {
        Assert.True(expected.Length == actual.Length, $"{what}: {actual.Length} bytes, expected {expected.Length}");
        int at = expected.AsSpan().CommonPrefixLength(actual);
        Assert.True(at == expected.Length, $"{what}: bytes differ first at offset {at}");
    }
}
