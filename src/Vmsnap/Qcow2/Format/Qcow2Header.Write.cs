using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Qcow2;

internal sealed partial class Qcow2Header
{
    /// <summary>
    /// Encodes the whole header cluster: fields, header extensions, end marker, then the backing file
    /// name right after the extensions (as QEMU lays it out). Sets <see cref="BackingFileOffset"/> and
    /// <see cref="BackingFileSize"/>. The rest of the cluster is zero.
    /// </summary>
    internal byte[] EncodeCluster()
    {
        int clusterSize = ClusterSize;
        byte[] buffer = new byte[clusterSize];
        Span<byte> b = buffer;
        int pos = HeaderLength;
        foreach (HeaderExtension e in Extensions)
        {
            if (pos + e.EncodedLength + 8 > clusterSize)
                throw new Qcow2FormatException("header", 0, $"header extensions do not fit into one {clusterSize}-byte cluster");
            BinaryPrimitives.WriteUInt32BigEndian(b[pos..], e.Type);
            BinaryPrimitives.WriteUInt32BigEndian(b[(pos + 4)..], (uint)e.Data.Length);
            e.Data.CopyTo(b[(pos + 8)..]);
            pos += e.EncodedLength;
        }
        pos += 8;   // end-of-extensions marker: type 0, length 0
        if (BackingFile is { } backing)
        {
            byte[] name = Encoding.UTF8.GetBytes(backing);
            if (name.Length > MaxBackingFileNameLength)
                throw new Qcow2FormatException("header", 8, $"backing file name of {name.Length} bytes is too long (at most {MaxBackingFileNameLength})");
            if (pos + name.Length > clusterSize)
                throw new Qcow2FormatException("header", 8, $"backing file name does not fit into the {clusterSize}-byte header cluster");
            name.CopyTo(b[pos..]);
            BackingFileOffset = (ulong)pos;
            BackingFileSize = (uint)name.Length;
        }
        else
        {
            BackingFileOffset = 0;
            BackingFileSize = 0;
        }
        EncodeFields(b);
        return buffer;
    }

    /// <summary>Encodes the fixed fields (and, for version 3, the rest up to header_length).</summary>
    internal void EncodeFields(Span<byte> b)
    {
        BinaryPrimitives.WriteUInt32BigEndian(b, Magic);
        BinaryPrimitives.WriteUInt32BigEndian(b[4..], (uint)Version);
        BinaryPrimitives.WriteUInt64BigEndian(b[8..], BackingFileOffset);
        BinaryPrimitives.WriteUInt32BigEndian(b[16..], BackingFileSize);
        BinaryPrimitives.WriteUInt32BigEndian(b[20..], (uint)ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(b[24..], Size);
        BinaryPrimitives.WriteUInt32BigEndian(b[32..], CryptMethod);
        EncodeL1Fields().CopyTo(b[L1SizeOffset..]);
        EncodeRefcountTableFields().CopyTo(b[RefcountTableFieldsOffset..]);
        EncodeSnapshotFields().CopyTo(b[SnapshotFieldsOffset..]);
        if (Version < 3) return;
        BinaryPrimitives.WriteUInt64BigEndian(b[72..], IncompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(b[80..], CompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(b[88..], AutoclearFeatures);
        BinaryPrimitives.WriteUInt32BigEndian(b[96..], (uint)RefcountOrder);
        BinaryPrimitives.WriteUInt32BigEndian(b[100..], (uint)HeaderLength);
        if (HeaderLength > Version3MinLength)
        {
            b[Version3MinLength] = CompressionType;
            TrailingFields.AsSpan(0, Math.Min(TrailingFields.Length, HeaderLength - Version3MinLength - 1)).CopyTo(b[(Version3MinLength + 1)..]);
        }
    }

    /// <summary>l1_size and l1_table_offset: 12 adjacent bytes at offset 36, rewritten together when the L1 table moves.</summary>
    internal byte[] EncodeL1Fields()
    {
        byte[] b = new byte[12];
        BinaryPrimitives.WriteUInt32BigEndian(b, L1Size);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(4), L1TableOffset);
        return b;
    }

    /// <summary>refcount_table_offset and refcount_table_clusters: 12 adjacent bytes at offset 48.</summary>
    internal byte[] EncodeRefcountTableFields()
    {
        byte[] b = new byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(b, RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(8), RefcountTableClusters);
        return b;
    }

    /// <summary>nb_snapshots and snapshots_offset: 12 adjacent bytes at offset 60.</summary>
    internal byte[] EncodeSnapshotFields()
    {
        byte[] b = new byte[12];
        BinaryPrimitives.WriteUInt32BigEndian(b, SnapshotCount);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(4), SnapshotsOffset);
        return b;
    }

    /// <summary>One big-endian 64-bit field (feature bitmaps at 72, 80, 88).</summary>
    internal static byte[] EncodeUInt64(ulong value)
    {
        byte[] b = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        return b;
    }
}
