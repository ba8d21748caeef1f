using System.Globalization;
using System.Text.Json.Serialization;
using Vmsnap.Qcow2;

namespace Vmsnap.Cli;

/// <summary>
/// The JSON of <c>info</c>, <c>check</c> and <c>snapshot list</c> in qemu-img's shape (QEMU 7.2 and 10.0
/// <c>qemu-img info --output=json</c> and <c>qemu-img check --output=json</c>; info's <c>children</c> is
/// 10.0's, which 7.2 leaves out): the same key names,
/// nesting, value types, and the same rules for when a key is left out, so that a script can switch
/// tools. vmsnap's own fields come after qemu-img's, in the same kebab-case style (marked "vmsnap's
/// own" below; the README lists them).
/// </summary>
internal static class QemuImgJson
{
    /// <summary>qemu-img's ImageInfo for a qcow2 image.</summary>
    internal sealed class ImageInfo
    {
        [JsonPropertyName("filename")] public required string Filename { get; init; }
        [JsonPropertyName("format")] public string Format => "qcow2";
        [JsonPropertyName("dirty-flag")] public required bool DirtyFlag { get; init; }
        [JsonPropertyName("actual-size")] public long? ActualSize { get; init; }
        [JsonPropertyName("virtual-size")] public required long VirtualSize { get; init; }
        [JsonPropertyName("cluster-size")] public required int ClusterSize { get; init; }
        [JsonPropertyName("backing-filename")] public string? BackingFilename { get; init; }
        [JsonPropertyName("full-backing-filename")] public string? FullBackingFilename { get; init; }
        [JsonPropertyName("backing-filename-format")] public string? BackingFilenameFormat { get; init; }
        [JsonPropertyName("snapshots")] public IReadOnlyList<SnapshotInfo>? Snapshots { get; init; }
        [JsonPropertyName("format-specific")] public required FormatSpecific FormatSpecific { get; init; }

        /// <summary>The block graph below the image, as QEMU 10's qemu-img prints it (7.2's does not): its file.</summary>
        [JsonPropertyName("children")] public required IReadOnlyList<ChildInfo> Children { get; init; }

        // vmsnap's own.
        [JsonPropertyName("file-length")] public required long FileLength { get; init; }
        [JsonPropertyName("l1-size")] public required int L1Size { get; init; }
    }

    /// <summary>One of QEMU's BlockChildInfo: the child's role ("file") and the node's info.</summary>
    internal sealed class ChildInfo
    {
        [JsonPropertyName("name")] public required string Name { get; init; }
        [JsonPropertyName("info")] public required FileNodeInfo Info { get; init; }
    }

    /// <summary>The info of the protocol node under the image: the host file itself, whose virtual size is its length in whole sectors.</summary>
    internal sealed class FileNodeInfo
    {
        [JsonPropertyName("children")] public IReadOnlyList<ChildInfo> Children => [];
        [JsonPropertyName("virtual-size")] public required long VirtualSize { get; init; }
        [JsonPropertyName("filename")] public required string Filename { get; init; }
        [JsonPropertyName("format")] public string Format => "file";
        [JsonPropertyName("actual-size")] public long? ActualSize { get; init; }
        [JsonPropertyName("format-specific")] public FileFormatSpecific FormatSpecific => new();
        [JsonPropertyName("dirty-flag")] public bool DirtyFlag => false;
    }

    /// <summary>The protocol node's format-specific union: type "file", no data.</summary>
    internal sealed class FileFormatSpecific
    {
        [JsonPropertyName("type")] public string Type => "file";
        [JsonPropertyName("data")] public EmptyObject Data => new();
    }

    /// <summary>Serialises as <c>{}</c>.</summary>
    internal sealed class EmptyObject;

    /// <summary>qemu-img's ImageInfoSpecific: a union tagged by its type.</summary>
    internal sealed class FormatSpecific
    {
        [JsonPropertyName("type")] public string Type => "qcow2";
        [JsonPropertyName("data")] public required Qcow2Data Data { get; init; }
    }

    /// <summary>qemu-img's ImageInfoSpecificQCow2. Version 2 images have only compat, refcount-bits and compression-type.</summary>
    internal sealed class Qcow2Data
    {
        [JsonPropertyName("compat")] public required string Compat { get; init; }
        [JsonPropertyName("extended-l2")] public bool? ExtendedL2 { get; init; }
        [JsonPropertyName("lazy-refcounts")] public bool? LazyRefcounts { get; init; }
        [JsonPropertyName("corrupt")] public bool? Corrupt { get; init; }
        [JsonPropertyName("refcount-bits")] public required int RefcountBits { get; init; }
        [JsonPropertyName("bitmaps")] public IReadOnlyList<Bitmap>? Bitmaps { get; init; }
        [JsonPropertyName("compression-type")] public required string CompressionType { get; init; }
    }

    /// <summary>qemu-img's Qcow2BitmapInfo.</summary>
    internal sealed class Bitmap
    {
        [JsonPropertyName("name")] public required string Name { get; init; }
        [JsonPropertyName("granularity")] public required long Granularity { get; init; }
        [JsonPropertyName("flags")] public required IReadOnlyList<string> Flags { get; init; }
    }

    /// <summary>qemu-img's SnapshotInfo (an element of info's snapshots), then vmsnap's own fields.</summary>
    internal sealed class SnapshotInfo
    {
        [JsonPropertyName("id")] public required string Id { get; init; }
        [JsonPropertyName("name")] public required string Name { get; init; }
        [JsonPropertyName("vm-state-size")] public required long VmStateSize { get; init; }
        [JsonPropertyName("date-sec")] public required long DateSec { get; init; }
        [JsonPropertyName("date-nsec")] public required long DateNsec { get; init; }
        [JsonPropertyName("vm-clock-sec")] public required long VmClockSec { get; init; }
        [JsonPropertyName("vm-clock-nsec")] public required long VmClockNsec { get; init; }
        [JsonPropertyName("icount")] public long? Icount { get; init; }

        // vmsnap's own.
        [JsonPropertyName("date")] public required string Date { get; init; }
        [JsonPropertyName("disk-size")] public required long DiskSize { get; init; }
        [JsonPropertyName("l1-table-offset")] public required long L1TableOffset { get; init; }
        [JsonPropertyName("l1-size")] public required int L1Size { get; init; }
    }

    /// <summary>qemu-img's ImageCheck: counts that are 0 are left out, check-errors never.</summary>
    internal sealed class ImageCheck
    {
        [JsonPropertyName("filename")] public required string Filename { get; init; }
        [JsonPropertyName("format")] public string Format => "qcow2";
        [JsonPropertyName("check-errors")] public required int CheckErrors { get; init; }
        [JsonPropertyName("image-end-offset")] public long? ImageEndOffset { get; init; }
        [JsonPropertyName("corruptions")] public int? Corruptions { get; init; }
        [JsonPropertyName("leaks")] public int? Leaks { get; init; }
        [JsonPropertyName("corruptions-fixed")] public int? CorruptionsFixed { get; init; }
        [JsonPropertyName("leaks-fixed")] public int? LeaksFixed { get; init; }
        [JsonPropertyName("total-clusters")] public long? TotalClusters { get; init; }
        [JsonPropertyName("allocated-clusters")] public long? AllocatedClusters { get; init; }
        [JsonPropertyName("fragmented-clusters")] public long? FragmentedClusters { get; init; }
        [JsonPropertyName("compressed-clusters")] public long? CompressedClusters { get; init; }

        // vmsnap's own.
        [JsonPropertyName("messages")] public required IReadOnlyList<string> Messages { get; init; }
    }

    /// <summary>
    /// info's JSON. <paramref name="filename"/> is the image as named on the command line, like
    /// qemu-img's filename (and the base of full-backing-filename).
    /// </summary>
    internal static ImageInfo Info(string filename, Qcow2ImageInfo i, IReadOnlyList<Qcow2Snapshot> snapshots)
    {
        bool v3 = i.Version >= 3;
        long? actualSize = FileAllocation.AllocatedBytes(filename);
        return new ImageInfo
        {
            Filename = filename,
            DirtyFlag = i.Dirty,
            ActualSize = actualSize,
            VirtualSize = i.VirtualSize,
            ClusterSize = i.ClusterSize,
            BackingFilename = string.IsNullOrEmpty(i.BackingFile) ? null : i.BackingFile,
            FullBackingFilename = string.IsNullOrEmpty(i.BackingFile) ? null : FullBackingFilename(filename, i.BackingFile),
            BackingFilenameFormat = string.IsNullOrEmpty(i.BackingFile) || string.IsNullOrEmpty(i.BackingFormat) ? null : i.BackingFormat,
            Snapshots = snapshots.Count == 0 ? null : snapshots.Select(Snapshot).ToArray(),
            FormatSpecific = new FormatSpecific
            {
                Data = new Qcow2Data
                {
                    Compat = i.Compat,
                    ExtendedL2 = v3 ? i.ExtendedL2 : null,
                    LazyRefcounts = v3 ? i.LazyRefcounts : null,
                    Corrupt = v3 ? i.Corrupt : null,
                    RefcountBits = i.RefcountBits,
                    Bitmaps = v3 && i.Bitmaps.Count > 0 ? i.Bitmaps.Select(BitmapOf).ToArray() : null,
                    CompressionType = i.CompressionType == Qcow2CompressionType.Zstd ? "zstd" : "zlib",
                },
            },
            // QEMU's block layer counts a node's length in 512-byte sectors, rounding the file's length up.
            Children = [new ChildInfo { Name = "file", Info = new FileNodeInfo { VirtualSize = (i.FileSize + 511) / 512 * 512, Filename = filename, ActualSize = actualSize } }],
            FileLength = i.FileSize,
            L1Size = i.L1Size,
        };
    }

    private static Bitmap BitmapOf(Qcow2BitmapInfo b) => new()
    {
        Name = b.Name,
        Granularity = b.Granularity,
        Flags = [.. b.InUse ? ["in-use"] : Array.Empty<string>(), .. b.Auto ? ["auto"] : Array.Empty<string>()],
    };

    /// <summary>One snapshot as qemu-img's info lists it (the guest clock split into seconds and nanoseconds of its unsigned value).</summary>
    internal static SnapshotInfo Snapshot(Qcow2Snapshot s)
    {
        ulong clock = unchecked((ulong)s.VmClock);
        return new SnapshotInfo
        {
            Id = s.Id,
            Name = s.Name,
            VmStateSize = s.VmStateSize,
            DateSec = s.DateSeconds,
            DateNsec = s.DateNanoseconds,
            VmClockSec = (long)(clock / 1_000_000_000),
            VmClockNsec = (long)(clock % 1_000_000_000),
            Icount = s.Icount == -1 ? null : s.Icount,
            Date = s.Date.UtcDateTime.ToString("yyyy-MM-dd'T'HH:mm:ss.ffffff'Z'", CultureInfo.InvariantCulture),
            DiskSize = s.DiskSize,
            L1TableOffset = s.L1TableOffset,
            L1Size = s.L1Size,
        };
    }

    /// <summary>check's JSON: after a repair, the counts are those of the second check, with what the repair fixed.</summary>
    internal static ImageCheck Check(string filename, Qcow2CheckResult r) => new()
    {
        Filename = filename,
        CheckErrors = r.CheckErrors,
        ImageEndOffset = NonZero(r.ImageEndOffset),
        Corruptions = NonZero(r.Corruptions),
        Leaks = NonZero(r.Leaks),
        CorruptionsFixed = NonZero(r.CorruptionsFixed),
        LeaksFixed = NonZero(r.LeaksFixed),
        TotalClusters = NonZero(r.TotalClusters),
        AllocatedClusters = NonZero(r.AllocatedClusters),
        FragmentedClusters = NonZero(r.FragmentedClusters),
        CompressedClusters = NonZero(r.CompressedClusters),
        Messages = r.Messages,
    };

    private static int? NonZero(int value) => value == 0 ? null : value;

    private static long? NonZero(long value) => value == 0 ? null : value;

    /// <summary>
    /// QEMU's full backing file name: the backing file itself when it is absolute or names a protocol
    /// ("nbd:..."), else the image's name up to its last '/' followed by it, without normalising.
    /// </summary>
    internal static string FullBackingFilename(string image, string backing)
    {
        if (backing.StartsWith('/') || HasProtocol(backing)) return backing;
        int slash = image.LastIndexOf('/');
        return image[..(slash + 1)] + backing;
    }

    /// <summary>A ':' before any '/': QEMU reads the part before it as a protocol.</summary>
    private static bool HasProtocol(string path)
    {
        int stop = path.AsSpan().IndexOfAny(':', '/');
        return stop >= 0 && path[stop] == ':';
    }
}
