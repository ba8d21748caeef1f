using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>Image creation, laid out as <c>qemu-img create -f qcow2</c> does.</summary>
internal sealed partial class Qcow2Engine
{
    private const int SizeOffset = 24;

    /// <summary>
    /// Writes a new empty image onto <paramref name="device"/> (which must be empty): header cluster,
    /// refcount table (cluster 1), one refcount block (cluster 2), then opens it and grows the L1 table
    /// to the size the disk needs (it lands in cluster 3, as with QEMU).
    /// </summary>
    internal static Qcow2Engine Create(IBlockDevice device, string path, long virtualSize, Qcow2CreateOptions options, bool ownsDevice)
    {
        Qcow2Header header = BuildHeader(virtualSize, options);
        int cs = header.ClusterSize;
        header.Size = 0;   // like QEMU: create empty, then resize (grow the L1 table, then set the size)
        try
        {
            device.SetLength(0);
            byte[] cluster0 = header.EncodeCluster();
            header.RefcountTableOffset = (ulong)cs;
            header.RefcountTableClusters = 1;
            header.EncodeFields(cluster0);
            byte[] table = new byte[cs];
            L1Entry.Encode([(ulong)(2L * cs)], table);
            byte[] block = new byte[cs];
            for (int c = 0; c < 3; c++) RefcountBlock.Set(block, c, header.RefcountOrder, 1);
            device.Write(cluster0, 0);
            device.Write(table, cs);
            device.Write(block, 2L * cs);
            device.Flush();
        }
        catch
        {
            if (ownsDevice) device.Dispose();
            throw;
        }
        Qcow2Engine engine = Open(device, path, new Qcow2OpenOptions { OpenBackingFile = false }, ownsDevice);
        try
        {
            lock (engine.SyncRoot)
            {
                engine.Mapping.GrowL1(engine.Geometry.L1EntriesFor(virtualSize), exact: true);
                engine.Caches.FlushAll();
                engine.State.File.Flush();
                engine.Header.Size = (ulong)virtualSize;
                engine.State.File.WriteHeader(Qcow2Header.EncodeUInt64((ulong)virtualSize), SizeOffset);
                engine.State.File.Flush();
            }
            return engine;
        }
        catch
        {
            engine.Dispose();
            throw;
        }
    }

    /// <summary>Validates creation options (before any file is touched) and builds the new image's header.</summary>
    internal static Qcow2Header BuildHeader(long virtualSize, Qcow2CreateOptions o)
    {
        int cs = o.ClusterSize;
        if (cs < 512 || cs > 2 << 20 || (cs & (cs - 1)) != 0)
            throw new ArgumentException($"cluster size {cs} must be a power of two between 512 and 2097152 bytes");
        int order = o.RefcountBits switch { 1 => 0, 2 => 1, 4 => 2, 8 => 3, 16 => 4, 32 => 5, 64 => 6, _ => -1 };
        if (order < 0) throw new ArgumentException($"refcount width {o.RefcountBits} must be one of 1, 2, 4, 8, 16, 32, 64 bits");
        if (o.Version is not (2 or 3)) throw new ArgumentException($"version {o.Version} must be 2 (compat 0.10) or 3 (compat 1.1)");
        if (virtualSize < 0 || virtualSize % 512 != 0) throw new ArgumentException($"virtual size {virtualSize} must be a non-negative multiple of 512 bytes");
        if (o.Version < 3)
        {
            if (order != 4) throw new ArgumentException("refcount widths other than 16 bits need compat 1.1 (version 3)");
            if (o.LazyRefcounts) throw new ArgumentException("lazy refcounts need compat 1.1 (version 3)");
            if (o.ExtendedL2) throw new ArgumentException("extended L2 entries need compat 1.1 (version 3)");
            if (o.CompressionType != Qcow2CompressionType.Zlib) throw new ArgumentException("compression types other than zlib need compat 1.1 (version 3)");
        }
        if (o.ExtendedL2 && cs < 16384) throw new ArgumentException($"extended L2 entries need clusters of at least 16384 bytes, not {cs}");
        if (o.BackingFormat is not null && o.BackingFile is null) throw new ArgumentException("a backing format needs a backing file");
        if (o.BackingFormat is not (null or "raw" or "qcow2")) throw new ArgumentException($"backing format '{o.BackingFormat}' must be raw or qcow2");

        int clusterBits = System.Numerics.BitOperations.Log2((uint)cs);
        var g = new ClusterGeometry(clusterBits, o.ExtendedL2, order);
        if (g.L1EntriesFor(virtualSize) * 8 > ClusterGeometry.MaxL1Bytes)
            throw new ArgumentException($"virtual size {virtualSize} needs an L1 table larger than qcow2 allows with {cs}-byte clusters");
        var h = new Qcow2Header
        {
            Version = o.Version,
            ClusterBits = clusterBits,
            Size = (ulong)virtualSize,
            RefcountOrder = order,
            HeaderLength = o.Version >= 3 ? Qcow2Header.QemuVersion3Length : Qcow2Header.Version2Length,
            TrailingFields = o.Version >= 3 ? new byte[Qcow2Header.QemuVersion3Length - Qcow2Header.Version3MinLength - 1] : [],
            CompatibleFeatures = o.LazyRefcounts ? Qcow2Header.CompatibleLazyRefcounts : 0,
            IncompatibleFeatures = (o.ExtendedL2 ? Qcow2Header.IncompatibleExtendedL2 : 0)
                | (o.CompressionType != Qcow2CompressionType.Zlib ? Qcow2Header.IncompatibleCompressionType : 0),
            CompressionType = (byte)o.CompressionType,
            BackingFile = o.BackingFile,
        };
        if (o.BackingFormat is not null) h.BackingFormat = o.BackingFormat;
        // QEMU leaves the feature name table out of small header clusters.
        if (o.Version >= 3 && cs > 4096)
            h.Extensions.Add(new HeaderExtension(HeaderExtension.FeatureNameTable, FeatureName.Encode(FeatureName.QemuTable)));
        return h;
    }
}
