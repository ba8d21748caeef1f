namespace Vmsnap.Qcow2;

/// <summary>What an image's header must satisfy before the engine opens it (QEMU's qcow2_do_open checks).</summary>
internal static class HeaderValidation
{
    /// <summary>Checks the header against the file: what QEMU refuses to open, vmsnap refuses too, with the reason.</summary>
    internal static void Validate(Qcow2Header h, long fileLength, bool forCheck = false)
    {
        if (h.CryptMethod != 0)
            throw new Qcow2FormatException("header", 32, $"encrypted images (crypt_method {h.CryptMethod}) are not supported");
        ulong unsupported = h.IncompatibleFeatures & ~Qcow2Header.IncompatibleSupported;
        if (unsupported != 0)
        {
            var names = new List<string>();
            for (int bit = 0; bit < 64; bit++)
                if ((unsupported & (1UL << bit)) != 0) names.Add(h.DescribeFeature(FeatureKind.Incompatible, bit));
            throw new Qcow2FormatException("header", Qcow2Header.IncompatibleFeaturesOffset,
                $"uses incompatible feature{(names.Count > 1 ? "s" : "")} vmsnap does not support: {string.Join(", ", names)}");
        }
        bool compressionBit = (h.IncompatibleFeatures & Qcow2Header.IncompatibleCompressionType) != 0;
        if (h.CompressionType > 1)
            throw new Qcow2FormatException("header", 104, $"unknown compression type {h.CompressionType}");
        if (compressionBit != (h.CompressionType != 0))
            throw new Qcow2FormatException("header", 104, compressionBit
                ? "the compression type feature bit is set but the compression type is deflate"
                : $"compression type {h.CompressionType} is set without the compression type feature bit");
        int clusterSize = h.ClusterSize;
        if (h.HasExtendedL2 && h.ClusterBits < 14)
            throw new Qcow2FormatException("header", 20, $"extended L2 entries need clusters of at least 16 KiB (subclusters of 512 bytes); cluster size is {clusterSize}");
        if (h.Size > (ulong)long.MaxValue / 2)
            throw new Qcow2FormatException("header", 24, $"virtual size {h.Size} is too large");

        var g = new ClusterGeometry(h.ClusterBits, h.HasExtendedL2, h.RefcountOrder);
        long needed = g.L1EntriesFor((long)h.Size);
        if ((long)h.L1Size * 8 > ClusterGeometry.MaxL1Bytes)
            throw new Qcow2FormatException("header", Qcow2Header.L1SizeOffset, $"l1_size {h.L1Size} is too large (the L1 table may have at most {ClusterGeometry.MaxL1Bytes / 8} entries)");
        if (h.L1Size < needed)
            throw new Qcow2FormatException("header", Qcow2Header.L1SizeOffset, $"l1_size {h.L1Size} is too small for the virtual size {h.Size} (needs {needed} entries)");
        if (h.L1Size > 0)
            CheckTable("L1 table", h.L1TableOffset, (long)h.L1Size * 8, clusterSize, fileLength, forCheck);

        // qemu-img check opens an image without a refcount table, or with tables past the end of
        // the file or on top of each other, and reports (or rebuilds) them.
        if (h.RefcountTableClusters == 0 && !forCheck)
            throw new Qcow2FormatException("header", Qcow2Header.RefcountTableFieldsOffset, "the image has no refcount table (refcount_table_clusters is 0)");
        if ((long)h.RefcountTableClusters * clusterSize > ClusterGeometry.MaxRefcountTableBytes)
            throw new Qcow2FormatException("header", Qcow2Header.RefcountTableFieldsOffset, $"refcount table of {h.RefcountTableClusters} clusters is too large (at most {ClusterGeometry.MaxRefcountTableBytes} bytes)");
        CheckTable("refcount table", h.RefcountTableOffset, (long)h.RefcountTableClusters * clusterSize, clusterSize, fileLength, forCheck);
        if (!forCheck && h.L1Size > 0 && Overlaps((long)h.L1TableOffset, (long)h.L1Size * 8, (long)h.RefcountTableOffset, (long)h.RefcountTableClusters * clusterSize))
            throw new Qcow2FormatException("refcount table", (long)h.RefcountTableOffset, $"overlaps the L1 table at 0x{h.L1TableOffset:x}");
    }

    private static void CheckTable(string name, ulong offset, long bytes, int clusterSize, long fileLength, bool forCheck)
    {
        // QEMU's qcow2_validate_table limit for the check; tighter otherwise.
        if (offset > (forCheck ? (ulong)(long.MaxValue - bytes) : long.MaxValue / 2))
            throw new Qcow2FormatException(name, null, $"offset 0x{offset:x} is beyond any file");
        long o = (long)offset;
        if ((o & (clusterSize - 1)) != 0)
            throw new Qcow2FormatException(name, o, $"offset is not aligned to a cluster ({clusterSize} bytes)");
        if (forCheck) return;
        if (o < clusterSize)
            throw new Qcow2FormatException(name, o, "overlaps the header cluster");
        // The last cluster of an image may be partly missing (QEMU writes an L1 table only as long as it is).
        if (o >= fileLength || o + bytes - fileLength >= clusterSize)
            throw new Qcow2FormatException(name, o, $"{bytes} bytes extend beyond the end of the file ({fileLength} bytes)");
    }

    private static bool Overlaps(long a, long aLength, long b, long bLength) => a < b + bLength && b < a + aLength;
}
