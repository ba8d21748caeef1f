namespace Vmsnap.Qcow2;

/// <summary>
/// The qcow2 header (first cluster): fixed fields, the version-3 fields, header extensions and the
/// backing file name. Fields vmsnap does not understand (header bytes past the compression type,
/// unknown extensions) are kept as they are so a rewrite does not lose them. Parsing lives in
/// Qcow2Header.Read.cs, encoding in Qcow2Header.Write.cs.
/// </summary>
internal sealed partial class Qcow2Header
{
    internal const uint Magic = 0x514649fb;            // "QFI\xfb"
    internal const int Version2Length = 72;
    internal const int Version3MinLength = 104;
    internal const int QemuVersion3Length = 112;       // what QEMU writes: through compression_type and its padding
    internal const int MinClusterBits = 9;
    internal const int MaxClusterBits = 21;            // QEMU's implementation limit (2 MiB)
    internal const int MaxBackingFileNameLength = 1023;

    // Field offsets QEMU updates in place with one small write.
    internal const int L1SizeOffset = 36;               // l1_size (4) + l1_table_offset (8)
    internal const int RefcountTableFieldsOffset = 48;  // refcount_table_offset (8) + refcount_table_clusters (4)
    internal const int SnapshotFieldsOffset = 60;       // nb_snapshots (4) + snapshots_offset (8)
    internal const int IncompatibleFeaturesOffset = 72;
    internal const int AutoclearFeaturesOffset = 88;

    internal const ulong IncompatibleDirty = 1UL << 0;
    internal const ulong IncompatibleCorrupt = 1UL << 1;
    internal const ulong IncompatibleExternalData = 1UL << 2;
    internal const ulong IncompatibleCompressionType = 1UL << 3;
    internal const ulong IncompatibleExtendedL2 = 1UL << 4;
    internal const ulong IncompatibleSupported = IncompatibleDirty | IncompatibleCorrupt | IncompatibleCompressionType | IncompatibleExtendedL2;
    internal const ulong CompatibleLazyRefcounts = 1UL << 0;
    internal const ulong AutoclearBitmaps = 1UL << 0;
    internal const ulong AutoclearRawExternalData = 1UL << 1;

    internal int Version { get; set; }
    internal ulong BackingFileOffset { get; set; }
    internal uint BackingFileSize { get; set; }
    internal int ClusterBits { get; set; }
    internal ulong Size { get; set; }
    internal uint CryptMethod { get; set; }
    internal uint L1Size { get; set; }
    internal ulong L1TableOffset { get; set; }
    internal ulong RefcountTableOffset { get; set; }
    internal uint RefcountTableClusters { get; set; }
    internal uint SnapshotCount { get; set; }
    internal ulong SnapshotsOffset { get; set; }
    internal ulong IncompatibleFeatures { get; set; }
    internal ulong CompatibleFeatures { get; set; }
    internal ulong AutoclearFeatures { get; set; }
    internal int RefcountOrder { get; set; } = 4;

    /// <summary>header_length: 72 for version 2, at least 104 for version 3.</summary>
    internal int HeaderLength { get; set; } = Version2Length;

    /// <summary>Byte 104 (version 3 with header_length above 104): 0 deflate, 1 zstd.</summary>
    internal byte CompressionType { get; set; }

    /// <summary>Header bytes 105 .. header_length: padding and fields vmsnap does not know, kept verbatim.</summary>
    internal byte[] TrailingFields { get; set; } = [];

    /// <summary>Header extensions in file order (the end marker is implied).</summary>
    internal List<HeaderExtension> Extensions { get; private set; } = [];

    /// <summary>Backing file name as stored (relative to the image's folder unless absolute), or null.</summary>
    internal string? BackingFile { get; set; }

    internal int ClusterSize => 1 << ClusterBits;
    internal int RefcountBits => 1 << RefcountOrder;
    internal bool IsDirty => (IncompatibleFeatures & IncompatibleDirty) != 0;
    internal bool IsCorrupt => (IncompatibleFeatures & IncompatibleCorrupt) != 0;
    internal bool HasExtendedL2 => (IncompatibleFeatures & IncompatibleExtendedL2) != 0;
    internal bool HasLazyRefcounts => (CompatibleFeatures & CompatibleLazyRefcounts) != 0;

    internal HeaderExtension? FindExtension(uint type) => Extensions.Find(e => e.Type == type);

    /// <summary>The backing format extension's text ("raw", "qcow2"), or null.</summary>
    internal string? BackingFormat
    {
        get => FindExtension(HeaderExtension.BackingFormat)?.DataAsString();
        set
        {
            int i = Extensions.FindIndex(e => e.Type == HeaderExtension.BackingFormat);
            if (value is null)
            {
                if (i >= 0) Extensions.RemoveAt(i);
                return;
            }
            var ext = new HeaderExtension(HeaderExtension.BackingFormat, System.Text.Encoding.UTF8.GetBytes(value));
            if (i >= 0) Extensions[i] = ext;
            else Extensions.Insert(0, ext);   // QEMU puts it first
        }
    }

    /// <summary>Names from the image's feature name table (empty when it has none).</summary>
    internal List<FeatureName> FeatureNames =>
        FindExtension(HeaderExtension.FeatureNameTable) is { } t ? FeatureName.Parse(t.Data) : [];

    /// <summary>The name of a feature bit: from the image's table, else from the names vmsnap knows.</summary>
    internal string DescribeFeature(FeatureKind kind, int bit)
    {
        foreach (FeatureName n in FeatureNames)
            if (n.Kind == kind && n.Bit == bit && n.Name.Length > 0) return $"'{n.Name}' (bit {bit})";
        foreach (FeatureName n in FeatureName.QemuTable)
            if (n.Kind == kind && n.Bit == bit) return $"'{n.Name}' (bit {bit})";
        return $"unknown {kind.ToString().ToLowerInvariant()} feature bit {bit}";
    }

    internal Qcow2Header Clone()
    {
        var h = (Qcow2Header)MemberwiseClone();
        h.TrailingFields = (byte[])TrailingFields.Clone();
        h.Extensions = Extensions.ConvertAll(e => e with { Data = (byte[])e.Data.Clone() });
        return h;
    }
}
